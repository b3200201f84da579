"""Stage I (64x64 base model): text-conditioned, the UNet input is x_t alone."""
from __future__ import annotations

import torch

from stages import sampling
from stages.task import ImageTask

RESOLUTION = 64


class Stage1Task(ImageTask):
    stage = 1
    resolution = RESOLUTION

    def batch(self, n: int, with_prior: bool, gen: torch.Generator) -> dict:
        return {"x0": self.draw_x0(n, with_prior, gen)}

    def model_input(self, x_t: torch.Tensor, batch: dict, gen: torch.Generator):
        return x_t, None

    def validation_samples(self, unet, scheduler, embeds, n: int, steps: int, gen: torch.Generator):
        return sampling.sample(unet, scheduler, embeds.instance.expand(n, -1, -1), embeds.negative, steps,
                               guidance_scale=self.guidance_scale, generator=gen, resolution=self.resolution)
