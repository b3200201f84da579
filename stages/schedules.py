"""Learning-rate schedules through diffusers' `get_scheduler`, one schedule step per optimizer step.

The trainer steps the schedule itself (engines.step_lr: once per optimizer step, after the last
micro-step of an accumulation, never once per process), so `num_training_steps` is the number of
optimizer steps, `train.max_steps`. The schedule is prepared by accelerate, so its state is part of
every checkpoint and a resumed run continues the same sequence."""
from __future__ import annotations

SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


def make_schedule(optimizer, cfg):
    """The LambdaLR for a Train config section (lr_scheduler, lr_warmup_steps, max_steps,
    lr_num_cycles for cosine_with_restarts, lr_power for polynomial)."""
    from diffusers.optimization import get_scheduler

    name = getattr(cfg, "lr_scheduler", "constant_with_warmup")
    if name == "constant":
        return get_scheduler(name, optimizer)
    return get_scheduler(name, optimizer, num_warmup_steps=cfg.lr_warmup_steps, num_training_steps=cfg.max_steps,
                         num_cycles=getattr(cfg, "lr_num_cycles", 1), power=getattr(cfg, "lr_power", 1.0))
