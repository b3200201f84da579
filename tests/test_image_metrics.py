"""PSNR/SSIM (scikit-image), the high-frequency energy ratio and LPIPS availability, on constructed inputs."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from cascade.evaluation.image_metrics import Lpips, hf_energy, hf_ratio, psnr, ssim


def _detailed(seed: int = 0, size: int = 64) -> torch.Tensor:
    """A [-1, 1] image with both smooth structure and fine detail."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    smooth = torch.stack([torch.sin(6 * xx + c) * torch.cos(4 * yy) for c in range(3)])
    return (0.6 * smooth + 0.3 * (torch.rand((3, size, size), generator=g) * 2 - 1)).clamp(-1, 1)


def _blur(x: torch.Tensor) -> torch.Tensor:
    k = torch.ones(3, 1, 5, 5) / 25
    return F.conv2d(F.pad(x.unsqueeze(0), (2, 2, 2, 2), mode="reflect"), k, groups=3)[0]


def test_hf_ratio_identical_blurred_and_noisier():
    x = _detailed()
    assert hf_ratio(x, x) == 1.0
    assert hf_ratio(_blur(x), x) < 0.5  # a 5x5 box blur removes most energy above 0.25 Nyquist
    noisy = (x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).clamp(-1, 1)
    assert hf_ratio(noisy, x) > 1.0  # added noise is high-frequency energy the reference lacks
    assert hf_ratio(x, hf_energy(x)) == 1.0  # a precomputed reference energy gives the same ratio


def test_hf_energy_ignores_flat_images_and_brightness():
    flat = torch.full((3, 32, 32), 0.3)
    assert hf_energy(flat) < 1e-12
    x = _detailed()
    assert abs(hf_energy(x + 0.1) - hf_energy(x)) < 1e-6 * hf_energy(x)  # the mean (DC) is removed


def test_psnr_ssim():
    x = _detailed()
    assert math.isinf(psnr(x, x)) and abs(ssim(x, x) - 1.0) < 1e-9
    noisy = (x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(2))).clamp(-1, 1)
    mse = (((noisy + 1) / 2 - (x + 1) / 2) ** 2).double().mean().item()
    assert abs(psnr(noisy, x) - 10 * math.log10(1 / mse)) < 1e-3  # dB on [0, 1] pixels
    assert ssim(_blur(x), x) < ssim(x, x) and ssim(noisy, x) < 1.0


def test_lpips_is_used_or_says_why_not():
    lp = Lpips()
    if lp.available:
        a = _detailed(0)
        assert lp.distance(a, a) < 1e-6 < lp.distance(a, _detailed(1))
        assert lp.mean_pairwise([a]) is None
    else:
        assert lp.reason and "lpips" in lp.reason
