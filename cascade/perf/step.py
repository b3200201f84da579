"""The synthetic training step that `cascade bench` times and the memory planner traces, in the
trainer's order (stages/trainer.py): the forward under autocast, the loss's backward and the optimizer
step outside it (autocast's weight copies die with the forward), so both measure what training holds."""
from __future__ import annotations

import torch


def synthetic_batch(config, n: int, text_len: int, dtype=None, generator=None, resolution: int | None = None):
    """Random inputs for a UNet config (`unet.config` or the dict it is built from): x_t, timesteps,
    text embeddings and, for stage II (`class_embed_type: timestep`), noise-level class labels."""
    size = resolution or config["sample_size"]
    x = torch.randn(n, config["in_channels"], size, size, generator=generator, dtype=dtype)
    t = torch.randint(0, 1000, (n,), generator=generator)
    width = config.get("encoder_hid_dim") or config["cross_attention_dim"]
    enc = torch.randn(n, text_len, width, generator=generator, dtype=dtype)
    labels = torch.randint(0, 1000, (n,), generator=generator) if config.get("class_embed_type") == "timestep" else None
    return x, t, enc, labels


def train_step(unet, optimizer, batch, autocast) -> torch.Tensor:
    """One step on `batch`: epsilon-style MSE on the first 3 output channels (the variance channels cost
    the same memory), gradients, the update, gradients freed; returns the loss (detached)."""
    x, t, enc, labels = batch
    with autocast:
        out = unet(x, t, encoder_hidden_states=enc, class_labels=labels, return_dict=False)[0]
    loss = (out.float()[:, :3] - x[:, :3].float()).pow(2).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()
