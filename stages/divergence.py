"""Stop at the first non-finite loss, on every process at the same micro-step.

Each rank's loss is gathered after backward (DDP has already all-reduced the gradients there, so a
NaN on one rank has poisoned every rank's gradients), and all ranks raise together before the
optimizer step: no rank waits forever in a collective, and no NaN update, checkpoint or export is
written. The last checkpoint on disk is the last good state.
"""
from __future__ import annotations

import torch

from stages import checkpoint
from stages.errors import TrainingDiverged


def stop_if_diverged(accelerator, loss: torch.Tensor, stage: int, step: int, ckpt_dir):
    losses = accelerator.gather(loss.detach().float().reshape(1))
    if bool(torch.isfinite(losses).all()):
        return
    values = ", ".join(f"{v:g}" for v in losses.tolist())
    last = checkpoint.latest_checkpoint(ckpt_dir)
    raise TrainingDiverged(
        f"stage {stage} training diverged: the loss is not finite at step {step} ({values} over "
        f"{accelerator.num_processes} process(es)); stopped without an export; last good checkpoint: "
        f"{last or 'none'} (lower stage{stage}.train.learning_rate and start again with --overwrite)")
