"""Stage I (64x64 base model): text-conditioned, the UNet input is x_t alone."""
from __future__ import annotations

import torch

from stages import sampling

RESOLUTION = 64


class Stage1Task:
    stage = 1
    resolution = RESOLUTION

    def __init__(self, instance: torch.Tensor, prior: torch.Tensor | None = None, hflip: bool = False):
        """`instance` and `prior` are [N, 3, 64, 64] tensors in [-1, 1]."""
        self.instance, self.prior, self.hflip = instance, prior, hflip

    @property
    def has_prior(self) -> bool:
        return self.prior is not None

    def _draw(self, images: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
        x = images[torch.randint(0, images.shape[0], (n,), generator=gen)]
        if self.hflip:
            flip = torch.rand(n, generator=gen) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        return x

    def batch(self, n: int, with_prior: bool, gen: torch.Generator) -> dict:
        x0 = self._draw(self.instance, n, gen)
        if with_prior:
            x0 = torch.cat([x0, self._draw(self.prior, n, gen)])
        return {"x0": x0}

    def model_input(self, x_t: torch.Tensor, batch: dict, gen: torch.Generator):
        return x_t, None

    def validation_samples(self, unet, scheduler, embeds, n: int, steps: int, gen: torch.Generator):
        return sampling.sample(unet, scheduler, embeds.instance.expand(n, -1, -1), embeds.negative, steps,
                               guidance_scale=7.0, generator=gen, resolution=self.resolution)
