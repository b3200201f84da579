"""Stage I (base model, 64x64 for IF; the size is its UNet's sample_size): text-conditioned, the
UNet input is x_t alone."""
from __future__ import annotations

import torch

from stages import sampling
from stages.task import ImageTask


class Stage1Task(ImageTask):
    stage = 1

    def batch(self, n: int, with_prior: bool, gen: torch.Generator) -> dict:
        return self.draw(n, with_prior, gen)

    def model_input(self, x_t: torch.Tensor, batch: dict, gen: torch.Generator):
        return x_t, None

    def validation_samples(self, unet, scheduler, embeds, n: int, steps: int, gen: torch.Generator):
        return sampling.sample(unet, scheduler, embeds.instance.expand(n, -1, -1), embeds.negative, steps,
                               guidance_scale=self.guidance_scale, generator=gen, resolution=self.resolution)
