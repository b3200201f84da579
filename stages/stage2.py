"""Stage II (64 -> 256 super-resolution): the UNet input is x_t concatenated with the noised,
upsampled 64px image, and the noise-augmentation level is its `class_labels`. Training pairs are
the subject's real 256px images and their 64px views, conditioned exactly as at sampling time."""
from __future__ import annotations

import torch

from stages import data, noise_aug, sampling
from stages.task import ImageTask

RESOLUTION = 256
LOWRES = 64


class Stage2Task(ImageTask):
    stage = 2
    resolution = RESOLUTION

    def __init__(self, instance: torch.Tensor, noising_scheduler, noise_min: int, noise_max: int,
                 prior: torch.Tensor | None = None, random_crop: bool = False, hflip: bool = False,
                 sample_noise_level: int | None = None):
        """`instance`/`prior`: [N, 3, S, S] in [-1, 1] with S = 256, or larger when `random_crop`."""
        super().__init__(instance, prior, hflip)
        self.noising_scheduler = noising_scheduler
        self.noise_min, self.noise_max = noise_min, noise_max
        self.random_crop = random_crop
        self.sample_noise_level = noise_max if sample_noise_level is None else sample_noise_level

    def batch(self, n: int, with_prior: bool, gen: torch.Generator) -> dict:
        x0 = self.draw_x0(n, with_prior, gen)
        levels = noise_aug.sample_noise_levels(x0.shape[0], self.noise_min, self.noise_max, gen)
        return {"x0": x0, "lowres": data.downsample(x0, LOWRES), "noise_level": levels}

    def model_input(self, x_t: torch.Tensor, batch: dict, gen: torch.Generator):
        levels = batch["noise_level"].to(x_t.device)
        cond = noise_aug.noised_condition(batch["lowres"].to(x_t.device), RESOLUTION, levels,
                                          self.noising_scheduler, generator=gen)
        return noise_aug.model_input(x_t, cond), levels

    def validation_samples(self, unet, scheduler, embeds, n: int, steps: int, gen: torch.Generator):
        """Upsample the subject's own 64px views (the first n) with the identifier prompt."""
        n = min(n, self.instance.shape[0])
        lowres = data.downsample(data.downsample(self.instance[:n], RESOLUTION), LOWRES)
        return sampling.sample(unet, scheduler, embeds.instance.expand(n, -1, -1), embeds.negative, steps,
                               guidance_scale=self.guidance_scale, generator=gen, resolution=RESOLUTION, lowres=lowres,
                               noise_level=self.sample_noise_level, noising_scheduler=self.noising_scheduler)
