"""Gradient checkpointing that covers all of IF's UNet.

diffusers' `enable_gradient_checkpointing()` recomputes only the ResNets of IF's blocks: the
attention of `SimpleCrossAttnDown/UpBlock2D` and the whole `UNetMidBlock2DSimpleCrossAttn` keep
their activations (at 64 px the attention layers of IF-I-XL hold most of them). Here every ResNet and
every attention module of the UNet runs under `torch.utils.checkpoint` (non-reentrant), so only
their inputs are kept and the rest is recomputed in backward."""
from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import checkpoint


def _checkpointed(forward, *args, **kwargs):
    if torch.is_grad_enabled():
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return forward(*args, **kwargs)


def enable_full_checkpointing(unet) -> int:
    """Wrap the forward of every ResnetBlock2D and Attention; returns how many modules were wrapped.
    Replaces diffusers' own (resnet-only) checkpointing so nothing is recomputed twice."""
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D

    if getattr(unet, "_full_checkpointing", False):
        return unet._full_checkpointing
    unet.disable_gradient_checkpointing()
    n = 0
    for module in unet.modules():
        if isinstance(module, (ResnetBlock2D, Attention)):
            module.forward = functools.partial(_checkpointed, module.forward)
            n += 1
    unet._full_checkpointing = n
    return n


def apply(unet, mode) -> str:
    """mode: False/"none", True/"resnets" (diffusers' own), or "full"."""
    if mode in (False, "none"):
        return "none"
    if mode == "full":
        enable_full_checkpointing(unet)
        return "full"
    unet.enable_gradient_checkpointing()
    return "resnets"
