"""The hybrid loss: learned-range variance as diffusers samples it, a bound term that is zero at the
true posterior and trains only the variance channels, prior-preservation weighting."""
from __future__ import annotations

import torch

from cascade.tiny import if_scheduler
from stages.losses import DiffusionMath, diffusion_loss, prior_preservation_split, vlb_bits_per_dim


def test_learned_variance_matches_diffusers_scheduler():
    sched = if_scheduler(1.5)
    m = DiffusionMath(sched.alphas_cumprod)
    for t in (1, 10, 500, 999):
        v = torch.tensor([-1.0, -0.3, 0.4, 1.0]).view(4, 1, 1, 1)
        ours = m.learned_log_variance(v, torch.full((4,), t))
        # diffusers' learned_range returns the log-variance itself for that variance type
        theirs = torch.stack([sched._get_variance(t, predicted_variance=vi.view(1)) for vi in v.view(-1)]).view(4, 1, 1, 1)
        assert torch.allclose(ours, theirs.float(), atol=1e-5), t


def test_q_sample_equals_add_noise():
    sched = if_scheduler(1.5)
    m = DiffusionMath(sched.alphas_cumprod)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 3, 8, 8, generator=g), torch.randn(3, 3, 8, 8, generator=g)
    t = torch.tensor([0, 250, 999])
    assert torch.allclose(m.q_sample(x0, noise, t), sched.add_noise(x0, noise, t), atol=1e-6)


def _setup(t_values=(0, 5, 300, 900)):
    m = DiffusionMath(if_scheduler(1.5).alphas_cumprod)
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(len(t_values), 3, 8, 8, generator=g) * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    t = torch.tensor(t_values)
    return m, x0, noise, t, m.q_sample(x0, noise, t)


def test_bound_term_is_zero_at_the_true_posterior():
    m, x0, noise, t, xt = _setup((5, 300, 900))
    v_true = -torch.ones_like(x0)  # v = -1 selects the posterior variance
    exact = vlb_bits_per_dim(m, x0, xt, t, noise, v_true)
    assert exact.abs().max() < 1e-4
    wrong_var = vlb_bits_per_dim(m, x0, xt, t, noise, torch.ones_like(x0))
    wrong_mean = vlb_bits_per_dim(m, x0, xt, t, noise + 0.3, v_true)
    # beta_t and the posterior variance differ most at small t (they converge as t grows)
    assert wrong_var[0] > 1e-3 and (wrong_var > -1e-6).all() and (wrong_mean > 1e-4).all()


def test_decoder_nll_at_t0_is_finite_and_prefers_the_right_mean():
    m, x0, noise, t, xt = _setup((0, 0))
    v = -torch.ones_like(x0)
    good = vlb_bits_per_dim(m, x0, xt, t, noise, v)
    bad = vlb_bits_per_dim(m, x0, xt, t, noise + 0.5, v)
    assert torch.isfinite(good).all() and (good < bad).all()


def test_hybrid_trains_variance_only_through_the_bound():
    m, x0, noise, t, xt = _setup()
    out = torch.randn(x0.shape[0], 6, 8, 8, generator=torch.Generator().manual_seed(2), requires_grad=True)
    hybrid = diffusion_loss(m, out, x0, xt, noise, t, "hybrid", vlb_weight=1.0)
    eps_only = diffusion_loss(m, out, x0, xt, noise, t, "epsilon")
    vlb = vlb_bits_per_dim(m, x0, xt, t, out[:, :3].detach(), out[:, 3:])
    assert torch.allclose(hybrid, eps_only + vlb, atol=1e-6)
    half = diffusion_loss(m, out, x0, xt, noise, t, "hybrid", vlb_weight=0.5)
    assert torch.allclose(half, eps_only + 0.5 * vlb, atol=1e-6)
    # the epsilon channels get exactly the MSE gradient; the variance channels only the bound's
    (g_h,) = torch.autograd.grad(hybrid.sum(), out)
    (g_e,) = torch.autograd.grad(eps_only.sum(), out)
    assert torch.allclose(g_h[:, :3], g_e[:, :3], atol=1e-6)
    assert g_e[:, 3:].abs().max() == 0 and g_h[:, 3:].abs().max() > 0


def test_prior_preservation_split():
    per = torch.tensor([1.0, 3.0, 10.0, 20.0])
    total, inst, prior = prior_preservation_split(per, 2, 0.5)
    assert inst.item() == 2.0 and prior.item() == 15.0 and total.item() == 2.0 + 7.5
    total, inst, prior = prior_preservation_split(per[:2], 2, 1.0)
    assert prior is None and total.item() == 2.0
