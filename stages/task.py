"""What stage tasks share: subject (and class) image tensors and how a training batch is drawn."""
from __future__ import annotations

import torch

from stages import data


class ImageTask:
    """Holds [N, 3, S, S] tensors in [-1, 1]; draws `n` instance (+ `n` class) images per step."""
    resolution: int
    random_crop = False
    guidance_scale = 7.0  # for validation grids; set from the stage's sample settings

    def __init__(self, instance: torch.Tensor, prior: torch.Tensor | None = None, hflip: bool = False):
        self.instance, self.prior, self.hflip = instance, prior, hflip

    @property
    def has_prior(self) -> bool:
        return self.prior is not None

    def _draw(self, images: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
        x = images[torch.randint(0, images.shape[0], (n,), generator=gen)]
        if self.random_crop and x.shape[-1] > self.resolution:
            x = data.random_crops(x, self.resolution, gen)
        else:
            x = data.downsample(x, self.resolution)
        if self.hflip:
            flip = torch.rand(n, generator=gen) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        return x

    def draw_x0(self, n: int, with_prior: bool, gen: torch.Generator) -> torch.Tensor:
        x0 = self._draw(self.instance, n, gen)
        return torch.cat([x0, self._draw(self.prior, n, gen)]) if with_prior else x0
