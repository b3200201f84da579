"""Stage II (super-resolution; IF: 64 -> 256): the UNet input is x_t concatenated with the noised,
upsampled low-res image, and the noise-augmentation level is its `class_labels`. Training pairs are
the subject's real high-res images and their low-res views, conditioned exactly as at sampling time.
The high-res size is the UNet's sample_size; the low-res size is stage I's (the caller reads both)."""
from __future__ import annotations

import torch

from stages import data, noise_aug, sampling
from stages.task import ImageTask

SR_FACTOR = 4  # IF's stage II upsamples 4x (64 -> 256): the low-res size when nothing else names it


class Stage2Task(ImageTask):
    stage = 2

    def __init__(self, instance: torch.Tensor, noising_scheduler, noise_min: int, noise_max: int,
                 prior: torch.Tensor | None = None, random_crop: bool = False, hflip: bool = False,
                 sample_noise_level: int | None = None, resolution: int | None = None, lowres: int | None = None):
        """`instance`/`prior`: [N, 3, S, S] in [-1, 1] with S = `resolution` (default: the tensors' own
        size), or larger when `random_crop` (then `resolution` is required). `lowres`: the condition's
        size, default resolution // SR_FACTOR."""
        if random_crop and resolution is None:
            raise ValueError("random_crop needs the stage's resolution")
        super().__init__(instance, prior, hflip, resolution)
        self.lowres = lowres or self.resolution // SR_FACTOR
        self.noising_scheduler = noising_scheduler
        self.noise_min, self.noise_max = noise_min, noise_max
        self.random_crop = random_crop
        self.sample_noise_level = noise_max if sample_noise_level is None else sample_noise_level

    def batch(self, n: int, with_prior: bool, gen: torch.Generator) -> dict:
        batch = self.draw(n, with_prior, gen)
        x0 = batch["x0"]
        levels = noise_aug.sample_noise_levels(x0.shape[0], self.noise_min, self.noise_max, gen)
        return {**batch, "lowres": data.downsample(x0, self.lowres), "noise_level": levels}

    def model_input(self, x_t: torch.Tensor, batch: dict, gen: torch.Generator):
        levels = batch["noise_level"].to(x_t.device)
        cond = noise_aug.noised_condition(batch["lowres"].to(x_t.device), self.resolution, levels,
                                          self.noising_scheduler, generator=gen)
        return noise_aug.model_input(x_t, cond), levels

    def validation_samples(self, unet, scheduler, embeds, n: int, steps: int, gen: torch.Generator):
        """Upsample the subject's own low-res views (the first n) with the identifier prompt."""
        n = min(n, self.instance.shape[0])
        lowres = data.downsample(data.downsample(self.instance[:n], self.resolution), self.lowres)
        return sampling.sample(unet, scheduler, embeds.instance.expand(n, -1, -1), embeds.negative, steps,
                               guidance_scale=self.guidance_scale, generator=gen, resolution=self.resolution,
                               lowres=lowres, noise_level=self.sample_noise_level,
                               noising_scheduler=self.noising_scheduler)
