"""The hybrid loss (stages/losses.py): its schedule constants equal diffusers' DDPMScheduler, the bound
term vanishes exactly at the true posterior, trains only the variance, and prior preservation weights
the class half."""
from __future__ import annotations

import math

import pytest
import torch

from stages.losses import (DiffusionMath, diffusion_loss, discretized_gaussian_nll, normal_kl,
                           prior_preservation_split, vlb_bits_per_dim)


def _if_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon",
                         variance_type="learned_range")


@pytest.fixture(scope="module")
def sched():
    return _if_scheduler()


@pytest.fixture(scope="module")
def dm(sched):
    return DiffusionMath(sched.alphas_cumprod)


def _data(seed=0, shape=(4, 3, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(shape, generator=g) * 2 - 1
    noise = torch.randn(shape, generator=g)
    return x0, noise, g


@pytest.mark.parametrize("t", [1, 2, 3, 5, 10, 50, 100, 250, 500, 750, 900, 998, 999])
def test_learned_log_variance_equals_ddpm_scheduler(sched, dm, t):
    """The log-variance the loss trains is the one the stock learned_range sampler uses (t >= 1)."""
    g = torch.Generator().manual_seed(t)
    v = torch.rand(2, 3, 5, 5, generator=g) * 2 - 1
    v[0, 0, 0, 0], v[0, 0, 0, 1] = -1.0, 1.0  # both ends of the range
    ref = sched._get_variance(t, predicted_variance=v)
    ours = dm.learned_log_variance(v, torch.tensor([t, t]))
    assert torch.allclose(ours, ref, atol=1e-5, rtol=0), (ours - ref).abs().max()


def test_learned_range_endpoints(sched, dm):
    t = torch.tensor([10])
    one = torch.ones(1, 1, 1, 1)
    beta = 1 - sched.alphas_cumprod[10] / sched.alphas_cumprod[9]
    post = beta * (1 - sched.alphas_cumprod[9]) / (1 - sched.alphas_cumprod[10])
    assert dm.learned_log_variance(one, t).item() == pytest.approx(math.log(beta), abs=1e-5)
    assert dm.learned_log_variance(-one, t).item() == pytest.approx(math.log(post), abs=1e-5)
    assert math.log(post) < math.log(beta) - 0.1  # the range is not degenerate at this t


def test_q_sample_equals_add_noise(sched, dm):
    x0, noise, g = _data(1, (6, 3, 8, 8))
    t = torch.tensor([0, 1, 17, 500, 998, 999])
    assert torch.allclose(dm.q_sample(x0, noise, t), sched.add_noise(x0, noise, t), atol=1e-6)


def test_posterior_matches_ddpm_step_mean(dm):
    """The posterior mean q(x_{t-1} | x_t, x0) equals DDPMScheduler.step's mean given the true epsilon."""
    from diffusers import DDPMScheduler

    s = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", variance_type="fixed_small",
                      clip_sample=False)
    x0, noise, g = _data(2, (1, 3, 8, 8))
    for t in (5, 300, 800):
        xt = dm.q_sample(x0, noise, torch.tensor([t]))
        mean, log_var = dm.posterior(x0, xt, torch.tensor([t]))
        prev = s.step(noise, t, xt, generator=torch.Generator().manual_seed(0)).prev_sample
        z = torch.randn(xt.shape, generator=torch.Generator().manual_seed(0))  # the step's variance draw
        assert torch.allclose(mean, prev - s._get_variance(t) ** 0.5 * z, atol=1e-4), t
        assert torch.allclose(log_var.exp(), s._get_variance(t).expand_as(log_var), rtol=1e-5)


def test_normal_kl_equals_torch_distributions():
    g = torch.Generator().manual_seed(3)
    m1, m2 = torch.randn(10, generator=g), torch.randn(10, generator=g)
    lv1, lv2 = torch.randn(10, generator=g), torch.randn(10, generator=g)
    p = torch.distributions.Normal(m1, (0.5 * lv1).exp())
    q = torch.distributions.Normal(m2, (0.5 * lv2).exp())
    assert torch.allclose(normal_kl(m1, lv1, m2, lv2), torch.distributions.kl_divergence(p, q), atol=1e-5)


def test_discretized_nll_is_the_bin_probability():
    """Interior pixels: -log(P(bin)) of a Gaussian over a 2/255-wide bin (tanh CDF approximation ~1e-3)."""
    x = torch.tensor([-0.5, 0.0, 0.3, 0.9])
    mean = torch.tensor([-0.45, 0.02, 0.3, 0.7])
    log_scale = torch.log(torch.tensor([0.05, 0.1, 0.02, 0.2]))
    s = log_scale.exp()
    exact = -torch.log(torch.special.ndtr((x + 1 / 255 - mean) / s) - torch.special.ndtr((x - 1 / 255 - mean) / s))
    assert torch.allclose(discretized_gaussian_nll(x, mean, log_scale), exact, rtol=2e-3)
    # edge bins take the whole tail: x = 1 with the mean at 1 has probability ~1/2 + half a bin
    edge = discretized_gaussian_nll(torch.tensor([1.0]), torch.tensor([1.0]), torch.log(torch.tensor([0.01])))
    assert edge.item() == pytest.approx(-math.log(1 - float(torch.special.ndtr(torch.tensor(-1 / 255 / 0.01)))),
                                        rel=1e-2)


@pytest.mark.parametrize("t", [1, 10, 100, 500, 900])
def test_vlb_zero_at_true_posterior_positive_otherwise(dm, t):
    x0, noise, g = _data(4)
    tt = torch.full((4,), t)
    xt = dm.q_sample(x0, noise, tt)
    v_post = -torch.ones_like(x0)  # learned_range: v = -1 is exactly the posterior variance
    exact = vlb_bits_per_dim(dm, x0, xt, tt, noise, v_post)
    assert exact.shape == (4,)
    assert exact.abs().max() < 1e-6, exact
    wrong_eps = vlb_bits_per_dim(dm, x0, xt, tt, noise + 0.1 * torch.randn(x0.shape, generator=g), v_post)
    assert (wrong_eps > 1e-6).all() and (wrong_eps > 100 * exact.abs()).all()
    if t <= 500:  # late in the chain beta_t and beta~_t nearly coincide and v hardly matters
        wrong_var = vlb_bits_per_dim(dm, x0, xt, tt, noise, torch.ones_like(x0))
        assert (wrong_var > 1e-6).all()
        # KL between two zero-mean-difference Gaussians has the closed form 0.5 (r - 1 - log r), r = var ratio
        r = math.exp(dm.post_log_var[t].item() - math.log(dm.betas[t].item()))
        assert wrong_var[0].item() == pytest.approx(0.5 * (r - 1 - math.log(r)) / math.log(2), rel=1e-2)


def test_vlb_at_t0_is_the_decoder_nll(dm):
    x0, noise, g = _data(5)
    t = torch.zeros(4, dtype=torch.long)
    xt = dm.q_sample(x0, noise, t)
    v = torch.zeros_like(x0)
    mean, _ = dm.posterior(dm.predict_x0(xt, noise, t), xt, t)
    nll = discretized_gaussian_nll(x0, mean, 0.5 * dm.learned_log_variance(v, t)).mean(dim=(1, 2, 3)) / math.log(2)
    assert torch.allclose(vlb_bits_per_dim(dm, x0, xt, t, noise, v), nll)


def _model_output(seed=6, shape=(4, 6, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 0.5).requires_grad_(True)


def test_detached_eps_vlb_trains_only_the_variance_channels(dm):
    x0, noise, _ = _data(7)
    t = torch.tensor([3, 40, 400, 0])
    xt = dm.q_sample(x0, noise, t)
    out = _model_output()
    eps, v = out.split(3, dim=1)
    vlb_bits_per_dim(dm, x0, xt, t, eps.detach(), v).sum().backward()
    assert out.grad[:, :3].abs().max() == 0
    assert (out.grad[:, 3:].abs().sum(dim=(1, 2, 3)) > 0).all()
    # without the detach the bound would also move epsilon: the detach is what the test guards
    out2 = _model_output()
    eps2, v2 = out2.split(3, dim=1)
    vlb_bits_per_dim(dm, x0, xt, t, eps2, v2).sum().backward()
    assert out2.grad[:, :3].abs().max() > 0


def test_hybrid_epsilon_gradient_is_the_mse_gradient(dm):
    x0, noise, _ = _data(8)
    t = torch.tensor([3, 40, 400, 0])
    xt = dm.q_sample(x0, noise, t)
    hyb, eps_only = _model_output(9), _model_output(9)
    diffusion_loss(dm, hyb, x0, xt, noise, t, "hybrid", 1.0).sum().backward()
    diffusion_loss(dm, eps_only, x0, xt, noise, t, "epsilon").sum().backward()
    assert torch.allclose(hyb.grad[:, :3], eps_only.grad[:, :3], atol=1e-7)
    assert eps_only.grad[:, 3:].abs().max() == 0 and hyb.grad[:, 3:].abs().max() > 0
    # d/d eps of mean((eps - noise)^2) over C*H*W elements
    expected = 2 * (eps_only.detach()[:, :3] - noise) / (3 * 8 * 8)
    assert torch.allclose(eps_only.grad[:, :3], expected, atol=1e-7)


@pytest.mark.parametrize("vlb_weight", [1.0, 0.001, 2.5])
def test_hybrid_exceeds_epsilon_by_weighted_vlb(dm, vlb_weight):
    x0, noise, _ = _data(10)
    t = torch.tensor([1, 33, 333, 0])
    xt = dm.q_sample(x0, noise, t)
    out = _model_output(11).detach()
    eps_loss = diffusion_loss(dm, out, x0, xt, noise, t, "epsilon")
    hybrid = diffusion_loss(dm, out, x0, xt, noise, t, "hybrid", vlb_weight)
    vlb = vlb_bits_per_dim(dm, x0, xt, t, out[:, :3], out[:, 3:])
    assert torch.allclose(eps_loss, ((out[:, :3] - noise) ** 2).mean(dim=(1, 2, 3)))
    assert (vlb > 0).all()
    assert torch.allclose(hybrid - eps_loss, vlb_weight * vlb, atol=1e-6)
    assert (hybrid > eps_loss).all()


def test_prior_preservation_split_weights_the_class_half():
    per = torch.tensor([1.0, 3.0, 10.0, 30.0])
    total, inst, prior = prior_preservation_split(per, 2, 0.5)
    assert inst.item() == 2.0 and prior.item() == 20.0 and total.item() == 2.0 + 0.5 * 20.0
    total0, _, _ = prior_preservation_split(per, 2, 0.0)
    assert total0.item() == 2.0
    # the gradient reaching a class example is prior_weight / n_class
    p = per.clone().requires_grad_(True)
    prior_preservation_split(p, 2, 0.5)[0].backward()
    assert p.grad.tolist() == [0.5, 0.5, 0.25, 0.25]
    total, inst, prior = prior_preservation_split(per[:2], 2, 0.5)
    assert prior is None and total.item() == inst.item() == 2.0
