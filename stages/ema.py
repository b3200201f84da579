"""EMA of the trained weights (train.ema): diffusers' EMAModel over the trainable parameters (the
adapters under LoRA), with an fp32 shadow copy (a bf16 shadow would round away updates of size
(1 - decay) x delta) held on the training device or, with ema_on_cpu, in host memory.

EMAModel's decay warms up as (1 + n) / (10 + n) after `update_after_step` optimizer steps (before
that it copies the weights) and is capped at `decay`. The trainer steps it once per optimizer step,
registers it for accelerate's checkpoints (resume-exact), and copies the average into the model
before the export, which then holds the EMA weights (cascade.json says so)."""
from __future__ import annotations

import torch

from stages.errors import InputError


def check_engine(engine: str):
    if engine != "ddp":
        raise InputError(f"train.ema works in one process or under DDP, not under {engine}: the weights are "
                         "sharded there; switch ema off or use DDP")


class TrainingEMA:
    def __init__(self, params, decay: float, start_step: int = 0, on_cpu: bool = False):
        from diffusers.training_utils import EMAModel

        self.params = list(params)
        self.device = torch.device("cpu") if on_cpu else self.params[0].device
        self.on_cpu = on_cpu
        self.model = EMAModel([p.detach().to(self.device, torch.float32) for p in self.params], decay=decay,
                              update_after_step=start_step)

    def _sources(self):
        """The parameters EMAModel averages towards: the live ones, or (on_cpu) fp32 host copies of
        them, which keep requires_grad: EMAModel averages only parameters that train."""
        if not self.on_cpu:
            return self.params
        return [p.detach().to(self.device, torch.float32).requires_grad_(p.requires_grad) for p in self.params]

    @torch.no_grad()
    def step(self):
        self.model.step(self._sources())

    @property
    def shadow(self) -> list[torch.Tensor]:
        return self.model.shadow_params

    def copy_to_model(self):
        """Overwrite the trained parameters with their average (done once, before the export)."""
        self.model.copy_to(self.params)

    def bytes(self) -> int:
        return sum(s.numel() * s.element_size() for s in self.shadow)

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict):
        self.model.load_state_dict(state)
        self.model.shadow_params = [s.to(self.device, torch.float32) for s in self.model.shadow_params]

    def metadata(self) -> dict:
        m = self.model
        return {"decay": m.decay, "start_step": m.update_after_step, "on_cpu": self.on_cpu,
                "optimization_steps": m.optimization_step, "last_decay": getattr(m, "cur_decay_value", None)}
