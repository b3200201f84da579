"""Caption dropout: each training row is trained on the empty prompt with probability p, so the
fine-tuned model keeps a working unconditional prediction for classifier-free guidance. The empty
prompt's embedding is encoded by the caller together with every other prompt (a stage never loads
the text encoder); the draw comes from the micro-step's generator, so runs and resumes repeat it."""
from __future__ import annotations

import torch


def drop_captions(text: torch.Tensor, empty: torch.Tensor, p: float, gen: torch.Generator):
    """(text with dropped rows replaced by `empty` [1, L, D], boolean mask [B] of dropped rows or
    None when p is 0: then nothing is drawn, and a run without dropout is unchanged)."""
    if p <= 0:
        return text, None
    drop = torch.rand(text.shape[0], generator=gen) < p
    mask = drop.to(text.device).view(-1, 1, 1)
    return torch.where(mask, empty.to(text.device, text.dtype).expand_as(text), text), drop
