"""Diffusion training losses for IF's 6-channel UNets.

The UNet predicts epsilon (3 channels) and a value v in [-1, 1] per pixel (3 channels) that
interpolates the log-variance between beta_t and the posterior variance beta~_t ("learned_range",
improved DDPM eq. 15). Training only the epsilon MSE would leave v untrained and the stock
learned-range sampler invalid, so the hybrid loss adds the variational-bound term for the single
sampled timestep with the model mean built from a *detached* epsilon: the bound then trains only
the variance (improved DDPM sec. 3.1; guided-diffusion's `training_losses`). With one timestep
drawn uniformly, weight 1.0 on that term equals lambda = 1/T on the full bound.
"""
from __future__ import annotations

import math

import torch


def split_output(model_output: torch.Tensor, channels: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    eps, v = model_output.split(channels, dim=1)
    return eps, v


def _gather(values: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    return values.to(t.device)[t].float().view(-1, *([1] * (ndim - 1)))


class DiffusionMath:
    """Per-timestep constants of a discrete schedule (built from a diffusers scheduler's alphas_cumprod)."""

    def __init__(self, alphas_cumprod: torch.Tensor):
        ac = alphas_cumprod.double()
        ac_prev = torch.cat([ac.new_ones(1), ac[:-1]])
        self.alphas_cumprod = ac.float()
        # The variance bounds are computed in float32 with DDPMScheduler._get_variance's exact operations:
        # at small t, 1 - ac/ac_prev cancels and float64 would differ from the sampler by up to 3e-4 in
        # log-variance, so the v the loss trains would not be the v the stock sampler reads.
        ac32 = alphas_cumprod.float()
        ac_prev32 = torch.cat([ac32.new_ones(1), ac32[:-1]])
        beta32 = 1 - ac32 / ac_prev32
        post_var = torch.clamp((1 - ac_prev32) / (1 - ac32) * beta32, min=1e-20)
        self.betas = beta32
        # t = 0 has zero posterior variance; use t = 1's value there (guided-diffusion's clipping)
        self.post_log_var = torch.log(torch.cat([post_var[1:2], post_var[1:]]))
        self.post_coef_x0 = ((1 - ac / ac_prev) * ac_prev.sqrt() / (1 - ac)).float()
        self.post_coef_xt = ((1 - ac_prev) * (ac / ac_prev).sqrt() / (1 - ac)).float()

    def q_sample(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ac = _gather(self.alphas_cumprod, t, x0.ndim)
        return ac.sqrt() * x0 + (1 - ac).sqrt() * noise

    def posterior(self, x0, xt, t):
        mean = _gather(self.post_coef_x0, t, xt.ndim) * x0 + _gather(self.post_coef_xt, t, xt.ndim) * xt
        return mean, _gather(self.post_log_var, t, xt.ndim).expand_as(xt)

    def predict_x0(self, xt, eps, t):
        ac = _gather(self.alphas_cumprod, t, xt.ndim)
        return (xt - (1 - ac).sqrt() * eps) / ac.sqrt()

    def v_target(self, x0, noise, t):
        """v = sqrt(ab) eps - sqrt(1 - ab) x0 (progressive distillation's v-parameterisation)."""
        ac = _gather(self.alphas_cumprod, t, x0.ndim)
        return ac.sqrt() * noise - (1 - ac).sqrt() * x0

    def eps_from_v(self, xt, v, t):
        ac = _gather(self.alphas_cumprod, t, xt.ndim)
        return ac.sqrt() * v + (1 - ac).sqrt() * xt

    def learned_log_variance(self, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """learned_range: v = -1 gives the posterior variance, v = +1 gives beta_t."""
        frac = (v + 1) / 2
        max_log = torch.log(_gather(self.betas, t, v.ndim))
        min_log = _gather(self.post_log_var, t, v.ndim)
        return frac * max_log + (1 - frac) * min_log


def normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _std_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_nll(x, mean, log_scale):
    """-log p(x) for 8-bit pixel values in [-1, 1] under a Gaussian discretised to bins of width 2/255."""
    centered = x - mean
    inv_stdv = torch.exp(-log_scale)
    cdf_plus = _std_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _std_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_probs = torch.where(x < -0.999, log_cdf_plus,
                            torch.where(x > 0.999, log_one_minus_cdf_min,
                                        torch.log((cdf_plus - cdf_min).clamp(min=1e-12))))
    return -log_probs


def vlb_bits_per_dim(math_: DiffusionMath, x0, xt, t, eps, v) -> torch.Tensor:
    """One term of the variational bound (bits/dim, per example): KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t))
    for t > 0 and the decoder NLL at t = 0. Pass a detached `eps` so only the variance learns from it."""
    true_mean, true_log_var = math_.posterior(x0, xt, t)
    model_mean, _ = math_.posterior(math_.predict_x0(xt, eps, t), xt, t)
    model_log_var = math_.learned_log_variance(v, t)
    kl = normal_kl(true_mean, true_log_var, model_mean, model_log_var).mean(dim=(1, 2, 3)) / math.log(2.0)
    nll = discretized_gaussian_nll(x0, model_mean, 0.5 * model_log_var).mean(dim=(1, 2, 3)) / math.log(2.0)
    return torch.where(t == 0, nll, kl)


def diffusion_loss(math_: DiffusionMath, model_output, x0, xt, noise, t, loss_type: str = "hybrid",
                   vlb_weight: float = 1.0, prediction_type: str = "epsilon", snr_gamma: float = 0.0) -> torch.Tensor:
    """Per-example loss [B]: epsilon (or v) MSE, plus the learned-variance bound term for `hybrid`.
    `snr_gamma` > 0 weights the MSE term by min-SNR-gamma (stages/loss_weighting.py)."""
    model_output = model_output.float()
    pred, v = split_output(model_output, x0.shape[1])
    if prediction_type == "epsilon":
        target, eps = noise.float(), pred
    elif prediction_type == "v_prediction":  # the scheduler's prediction_type says what the UNet outputs
        target, eps = math_.v_target(x0.float(), noise.float(), t), math_.eps_from_v(xt.float(), pred, t)
    else:
        raise ValueError(f"unsupported prediction_type {prediction_type!r} (epsilon or v_prediction)")
    loss = (pred - target).pow(2).mean(dim=(1, 2, 3))
    if snr_gamma > 0:
        from stages.loss_weighting import min_snr_weights

        loss = loss * min_snr_weights(math_.alphas_cumprod, t, snr_gamma, prediction_type)
    if loss_type == "hybrid":
        loss = loss + vlb_weight * vlb_bits_per_dim(math_, x0.float(), xt.float(), t, eps.detach(), v)
    return loss


def prior_preservation_split(per_example: torch.Tensor, n_instance: int, prior_weight: float):
    """Instance and class examples share one forward pass; returns (total, instance, prior) losses."""
    inst = per_example[:n_instance].mean()
    if per_example.shape[0] == n_instance:
        return inst, inst, None
    prior = per_example[n_instance:].mean()
    return inst + prior_weight * prior, inst, prior
