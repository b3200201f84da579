"""Stop at the first non-finite loss, on every process at the same micro-step.

Each rank's loss is gathered before backward (a NaN on one rank would poison every rank's gradients
in DDP's all-reduce, and optimizer-in-backward updates the weights during backward itself), and all
ranks raise together: no rank waits forever in a collective, and no NaN update, checkpoint or export
is written. The last checkpoint on disk is the last good state. (A finite loss whose backward
overflows is not caught here; fp16's GradScaler skips that step.)
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
