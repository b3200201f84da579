"""Stage II low-res conditioning, one function for training and sampling.

Exactly what `IFSuperResolutionPipeline` does: bilinear upsampling with align_corners=True, noise
added by the `image_noising_scheduler` at integer timestep `noise_level`; the result is
concatenated with x_t on the channel axis and `noise_level` is passed as `class_labels`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from stages.rng import randn


def upsample(lowres: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(lowres, (size, size), mode="bilinear", align_corners=True)


def noised_condition(lowres: torch.Tensor, size: int, noise_level: torch.Tensor, noising_scheduler,
                     noise: torch.Tensor | None = None, generator=None) -> torch.Tensor:
    """Upsample the [-1, 1] low-res image to `size` and noise it at the per-example `noise_level`."""
    up = upsample(lowres, size)
    if noise is None:
        noise = randn(up.shape, generator, up.dtype, up.device)
    return noising_scheduler.add_noise(up, noise, timesteps=noise_level.to(up.device))


def model_input(x_t: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
    return torch.cat([x_t, condition.to(x_t.dtype)], dim=1)


def sample_noise_levels(batch: int, low: int, high: int, generator: torch.Generator) -> torch.Tensor:
    """Noise-augmentation levels for training, uniform integers in [low, high] per example."""
    if not 0 <= low <= high <= 999:
        raise ValueError(f"noise levels must satisfy 0 <= low <= high <= 999, got {low}..{high}")
    return torch.randint(low, high + 1, (batch,), generator=generator)
