"""Ancestral sampling of one IF stage, step for step what IFPipeline / IFSuperResolutionPipeline do
(classifier-free guidance on the epsilon half, variance from the conditional half, the stage's
DDPM scheduler with learned-range variance and dynamic thresholding), but on embeddings we pass in
and with stage II's condition built by `noise_aug`, the same code that training uses."""
from __future__ import annotations

import copy

import torch

from stages import noise_aug
from stages.rng import randn


@torch.no_grad()
def sample(unet, scheduler, prompt_embeds: torch.Tensor, negative_embeds: torch.Tensor | None,
           steps: int, guidance_scale: float, generator, resolution: int,
           lowres: torch.Tensor | None = None, noise_level: int = 250, noising_scheduler=None,
           on_step=None) -> torch.Tensor:
    """Return images in [-1, 1], shape [B, 3, resolution, resolution]. `prompt_embeds` is [B, L, D].
    Random draws follow the pipelines' order (initial noise, then condition noise, then step noise)
    so a CPU generator with the same seed reproduces the diffusers pipeline's output. `generator` may
    be a list with one generator per image, making each image independent of the batch it is in.
    `on_step(i, steps)`, when given, is called after each step (the caller's progress display)."""
    scheduler = copy.deepcopy(scheduler)  # set_timesteps mutates; keep the caller's scheduler clean
    device, dtype = unet.device, unet.dtype
    batch = prompt_embeds.shape[0]
    cfg = guidance_scale > 1.0
    embeds = prompt_embeds.to(device, dtype)
    if cfg:
        if negative_embeds is None:
            raise ValueError("guidance_scale > 1 needs negative (empty-prompt) embeddings")
        embeds = torch.cat([negative_embeds.to(device, dtype).expand_as(embeds), embeds])
    scheduler.set_timesteps(steps, device=device)
    x = randn((batch, 3, resolution, resolution), generator, dtype, device)
    x = x * scheduler.init_noise_sigma
    class_labels = condition = None
    if lowres is not None:
        levels = torch.full((batch,), int(noise_level), dtype=torch.long)
        condition = noise_aug.noised_condition(lowres.to(device, dtype), resolution, levels, noising_scheduler,
                                               generator=generator)
        class_labels = torch.cat([levels] * 2) if cfg else levels
        class_labels = class_labels.to(device)
    timesteps = scheduler.timesteps
    for i, t in enumerate(timesteps):
        inp = x if condition is None else noise_aug.model_input(x, condition)
        inp = torch.cat([inp] * 2) if cfg else inp
        inp = scheduler.scale_model_input(inp, t)
        out = unet(inp, t, encoder_hidden_states=embeds, class_labels=class_labels, return_dict=False)[0]
        if cfg:
            uncond, cond = out.chunk(2)
            eps_u, _ = uncond.split(3, dim=1)
            eps_c, var = cond.split(3, dim=1)
            out = torch.cat([eps_u + guidance_scale * (eps_c - eps_u), var], dim=1)
        if scheduler.config.variance_type not in ("learned", "learned_range"):
            out = out[:, :3]
        x = scheduler.step(out, t, x, generator=generator, return_dict=False)[0]
        if on_step is not None:
            on_step(i + 1, len(timesteps))
    return x.float()
