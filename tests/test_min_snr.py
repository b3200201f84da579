"""Min-SNR-gamma weighting (train.snr_gamma): the weights equal the formula computed from the
scheduler's alphas_cumprod, and the hybrid loss weights its epsilon/v MSE term (only) by them."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from stages.loss_weighting import min_snr_weights
from stages.losses import DiffusionMath, diffusion_loss, vlb_bits_per_dim


def _scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", variance_type="learned_range")


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_weights_equal_the_formula(prediction_type):
    ac = _scheduler().alphas_cumprod
    t = torch.tensor([0, 5, 50, 200, 500, 999])
    w = min_snr_weights(ac, t, 5.0, prediction_type).numpy()
    a = ac.numpy().astype(np.float64)[t.numpy()]
    snr = a / (1 - a)
    expected = np.minimum(snr, 5.0) / (snr if prediction_type == "epsilon" else snr + 1)
    np.testing.assert_allclose(w, expected, rtol=1e-6)
    # low-noise timesteps (SNR >> 5) are down-weighted; at high noise epsilon keeps weight 1
    assert w[0] < 1e-3 and w[-1] == pytest.approx(1.0 if prediction_type == "epsilon" else snr[-1] / (snr[-1] + 1))
    assert torch.equal(min_snr_weights(ac, t, 0.0, prediction_type), torch.ones(6))  # off


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_hybrid_loss_weights_the_mse_term_only(prediction_type):
    math_ = DiffusionMath(_scheduler().alphas_cumprod)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 3, 8, 8, generator=g) * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    out = torch.randn(4, 6, 8, 8, generator=g)
    t = torch.tensor([3, 100, 400, 900])
    xt = math_.q_sample(x0, noise, t)
    plain = diffusion_loss(math_, out, x0, xt, noise, t, "hybrid", 1.0, prediction_type)
    weighted = diffusion_loss(math_, out, x0, xt, noise, t, "hybrid", 1.0, prediction_type, snr_gamma=5.0)
    eps = out[:, :3] if prediction_type == "epsilon" else math_.eps_from_v(xt, out[:, :3], t)
    vlb = vlb_bits_per_dim(math_, x0, xt, t, eps, out[:, 3:])
    w = min_snr_weights(math_.alphas_cumprod, t, 5.0, prediction_type)
    torch.testing.assert_close(weighted - vlb, w * (plain - vlb), rtol=1e-5, atol=1e-6)
    assert (weighted - plain).abs().max() > 1e-3  # the weighting really changes the loss
