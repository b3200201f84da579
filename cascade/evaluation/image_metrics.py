"""Pixel-level image measures for the SR study and DIV: PSNR and SSIM (scikit-image), a
high-frequency energy ratio (radial power spectrum), the correlation of high-pass bands (placement), and LPIPS from the `lpips` package where it
can be installed. Images are [3, H, W] tensors in [-1, 1], as everywhere in the stages."""
from __future__ import annotations

import numpy as np
import torch

HF_CUTOFF = 0.25  # fraction of the Nyquist radius above which spectrum energy counts as "high frequency"


def _hwc01(x: torch.Tensor) -> np.ndarray:
    return ((x.detach().float().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).cpu().numpy().astype(np.float64)


def psnr(generated: torch.Tensor, truth: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB on [0, 1] pixels (skimage.metrics); inf for identical images."""
    from skimage.metrics import peak_signal_noise_ratio

    a, b = _hwc01(truth), _hwc01(generated)
    if np.array_equal(a, b):
        return float("inf")
    return float(peak_signal_noise_ratio(a, b, data_range=1.0))


def ssim(generated: torch.Tensor, truth: torch.Tensor) -> float:
    """Structural similarity on [0, 1] pixels, per channel, with the standard Gaussian window of
    sigma 1.5 and population statistics (Wang et al. 2004; skimage.metrics)."""
    from skimage.metrics import structural_similarity

    return float(structural_similarity(_hwc01(truth), _hwc01(generated), channel_axis=-1, data_range=1.0,
                                       gaussian_weights=True, sigma=1.5, use_sample_covariance=False))


def high_pass(x: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """The grey image minus its Gaussian blur (sigma px): the band where fine detail lives."""
    import torch.nn.functional as F

    grey = x.detach().float().mean(0)[None, None]
    r = int(3 * sigma + 0.5)
    g = torch.exp(-torch.arange(-r, r + 1, dtype=torch.float32) ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    pad = F.pad(grey, (r, r, r, r), mode="reflect")
    blur = F.conv2d(F.conv2d(pad, g.view(1, 1, 1, -1)), g.view(1, 1, -1, 1))
    return (grey - blur)[0, 0]


def hp_correlation(generated: torch.Tensor, truth: torch.Tensor, sigma: float = 1.0) -> float:
    """Pearson correlation of the two images' high-pass bands: 1 = the same fine detail in the same
    places, 0 = unrelated detail (or none), whatever its amount. Sees placement, unlike the HF ratio."""
    a, b = high_pass(generated, sigma).flatten(), high_pass(truth, sigma).flatten()
    a, b = a - a.mean(), b - b.mean()
    den = float(a.norm() * b.norm())
    return float((a * b).sum()) / den if den > 0 else 0.0


def hf_energy(x: torch.Tensor, cutoff: float = HF_CUTOFF) -> float:
    """Power of the grey image's spectrum at radii above `cutoff` x Nyquist, per pixel (mean removed)."""
    grey = x.detach().float().mean(0)
    grey = grey - grey.mean()
    power = torch.fft.fft2(grey).abs() ** 2
    fy = torch.fft.fftfreq(grey.shape[0]).abs().unsqueeze(1)
    fx = torch.fft.fftfreq(grey.shape[1]).abs().unsqueeze(0)
    radius = torch.sqrt(fx ** 2 + fy ** 2) / 0.5  # 1.0 = Nyquist along an axis
    return float(power[radius > cutoff].sum() / grey.numel() ** 2)


def hf_ratio(generated: torch.Tensor, reference: torch.Tensor | float, cutoff: float = HF_CUTOFF) -> float:
    """High-frequency energy of `generated` over the reference's (an image, or a precomputed energy):
    below 1 = smoother than the reference (blurred), near 1 = as much detail, above 1 = more
    (noise or hallucinated texture; read it together with PSNR)."""
    ref = reference if isinstance(reference, float) else hf_energy(reference, cutoff)
    return hf_energy(generated, cutoff) / max(ref, 1e-12)


class Lpips:
    """LPIPS distance from the maintained `lpips` package, or the reason it is unavailable.

    The package needs torchvision (its backbones come from torchvision.models) and downloads the
    ImageNet backbone weights on first use; neither works everywhere, so callers report
    `reason` instead of a number when `available` is False."""

    def __init__(self, net: str = "alex"):
        self.net, self.model, self.reason = net, None, ""
        try:
            import lpips  # noqa: F401  (optional extra: pip install lpips, which pulls torchvision)
        except Exception as e:  # ImportError, or torchvision failing to import beside this torch
            self.reason = (f"the lpips package cannot be imported ({e.__class__.__name__}: {str(e).splitlines()[0][:120]}); "
                           f"it needs torchvision, which this environment cannot install")
            return
        try:
            self.model = lpips.LPIPS(net=net, verbose=False).eval()
        except Exception as e:  # no cached backbone weights and no network
            self.reason = f"lpips could not load its '{net}' backbone weights ({e.__class__.__name__}: {str(e)[:120]})"

    @property
    def available(self) -> bool:
        return self.model is not None

    @torch.no_grad()
    def distance(self, a: torch.Tensor, b: torch.Tensor) -> float:
        return float(self.model(a.unsqueeze(0).float(), b.unsqueeze(0).float()).item())

    def mean_pairwise(self, images: list[torch.Tensor]) -> float | None:
        """Mean LPIPS over all unordered pairs (DIV); None with fewer than two images."""
        pairs = [(i, j) for i in range(len(images)) for j in range(i + 1, len(images))]
        if not pairs:
            return None
        return float(np.mean([self.distance(images[i], images[j]) for i, j in pairs]))
