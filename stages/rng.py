"""Gaussian draws from one generator or one per batch element (as diffusers' randn_tensor), always on
the CPU so that a seed means the same numbers on every device."""
from __future__ import annotations

import torch


def randn(shape, generator, dtype=torch.float32, device="cpu") -> torch.Tensor:
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
        x = torch.cat([torch.randn((1, *shape[1:]), generator=g, dtype=dtype) for g in generator])
    else:
        x = torch.randn(shape, generator=generator, dtype=dtype)
    return x.to(device)
