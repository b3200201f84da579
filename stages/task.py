"""What stage tasks share: subject (and class) image tensors and how a training batch is drawn."""
from __future__ import annotations

import torch

from stages import data


class ImageTask:
    """Holds [N, 3, S, S] tensors in [-1, 1]; draws `n` instance (+ `n` class) images per step.

    With per-image captions (`set_captions`), each drawn instance image brings its own caption's
    embedding and the batch carries "encoder_hidden_states" (instance rows, then prior rows), which
    the trainer uses instead of its one fixed prompt embedding."""
    random_crop = False
    guidance_scale = 7.0  # for validation grids; set from the stage's sample settings

    def __init__(self, instance: torch.Tensor, prior: torch.Tensor | None = None, hflip: bool = False,
                 resolution: int | None = None):
        """`resolution`: the stage's training size (its UNet's sample_size); default the tensors' own."""
        self.instance, self.prior, self.hflip = instance, prior, hflip
        self.resolution = resolution or instance.shape[-1]
        self.instance_text: torch.Tensor | None = None
        self.prior_text: torch.Tensor | None = None

    @property
    def has_prior(self) -> bool:
        return self.prior is not None

    def set_captions(self, instance_text: torch.Tensor, prior_text: torch.Tensor | None):
        """`instance_text`: [N, L, D], row i the embedding of instance image i's caption;
        `prior_text`: [1, L, D], the class prompt's embedding for the prior rows."""
        if instance_text.shape[0] != self.instance.shape[0]:
            raise ValueError(f"{instance_text.shape[0]} caption embeddings for {self.instance.shape[0]} images")
        self.instance_text, self.prior_text = instance_text, prior_text

    def _draw(self, images: torch.Tensor, n: int, gen: torch.Generator):
        idx = torch.randint(0, images.shape[0], (n,), generator=gen)
        x = images[idx]
        if self.random_crop and x.shape[-1] > self.resolution:
            x = data.random_crops(x, self.resolution, gen)
        else:
            x = data.downsample(x, self.resolution)
        if self.hflip:
            flip = torch.rand(n, generator=gen) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        return x, idx

    def draw(self, n: int, with_prior: bool, gen: torch.Generator) -> dict:
        """{"x0": [n (+ n), 3, S, S]} plus "encoder_hidden_states" when captions are set."""
        x0, idx = self._draw(self.instance, n, gen)
        if with_prior:
            x0 = torch.cat([x0, self._draw(self.prior, n, gen)[0]])
        batch = {"x0": x0}
        if self.instance_text is not None:
            rows = [self.instance_text[idx]] + ([self.prior_text.expand(n, -1, -1)] if with_prior else [])
            batch["encoder_hidden_states"] = torch.cat(rows)
        return batch
