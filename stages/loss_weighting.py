"""Min-SNR-gamma loss weighting (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR
Weighting Strategy"): the per-timestep MSE is reweighted so that low-noise timesteps, whose SNR is
huge and whose loss is easy, stop dominating the gradient. With SNR(t) = ab_t / (1 - ab_t):

- epsilon prediction: w(t) = min(SNR, gamma) / SNR
- v prediction:       w(t) = min(SNR, gamma) / (SNR + 1)

Only the epsilon/v MSE term is weighted; the learned-variance bound term of the hybrid loss keeps
its own weight (train.vlb_weight)."""
from __future__ import annotations

import torch


def snr(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """SNR of each timestep in `t` [B], in float64 (1 - ab is tiny at small t)."""
    ac = alphas_cumprod.to(t.device).double()[t]
    return ac / (1 - ac)


def min_snr_weights(alphas_cumprod: torch.Tensor, t: torch.Tensor, gamma: float,
                    prediction_type: str = "epsilon") -> torch.Tensor:
    """Per-example weights [B] (float32) for the MSE term; all ones when gamma is 0 (off)."""
    if gamma <= 0:
        return torch.ones(t.shape, device=t.device)
    s = snr(alphas_cumprod, t)
    clipped = torch.clamp(s, max=gamma)
    if prediction_type == "epsilon":
        w = clipped / s
    elif prediction_type == "v_prediction":
        w = clipped / (s + 1)
    else:
        raise ValueError(f"min-SNR weighting: unsupported prediction_type {prediction_type!r}")
    return w.float()
