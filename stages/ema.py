"""EMA of the trained weights (train.ema): diffusers' EMAModel over the trainable parameters (the
adapters under LoRA), with an fp32 shadow copy (a bf16 shadow would round away updates of size
(1 - decay) x delta) held on the training device or, with ema_on_cpu, in host memory.

EMAModel's decay warms up as (1 + n) / (10 + n) after `update_after_step` optimizer steps (before
that it copies the weights) and is capped at `decay`. The trainer steps it once per optimizer step,
writes it into every checkpoint as `ema.safetensors` + `ema.json` (resume-exact; not accelerate's
custom-state registration, whose loader unpickles without the weights-only guard: a crafted checkpoint
would run code, tests/test_safety_resume.py), and copies the average into the model before the export, which then holds the
EMA weights (cascade.json says so)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from stages.errors import InputError

EMA_WEIGHTS, EMA_STATE = "ema.safetensors", "ema.json"
# EMAModel's settings and counters, saved beside the average (the shadow tensors)
_COUNTERS = ("decay", "min_decay", "optimization_step", "update_after_step", "use_ema_warmup", "inv_gamma", "power")


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

    def save(self, folder: Path):
        """The average as tensors (safetensors) and its counters as JSON: nothing a load could run."""
        from safetensors.torch import save_file

        m = self.model
        save_file({f"shadow.{i:06d}": s.detach().contiguous() for i, s in enumerate(self.shadow)},
                  str(Path(folder) / EMA_WEIGHTS))
        state = {k: getattr(m, k) for k in _COUNTERS}
        state["last_decay"] = getattr(m, "cur_decay_value", None)  # what the export reports after a resume
        tmp = Path(folder) / (EMA_STATE + ".tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, Path(folder) / EMA_STATE)

    def load(self, folder: Path):
        """Restore what `save` wrote; a missing, unreadable or mismatched file is one line."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        folder = Path(folder)
        for name in (EMA_WEIGHTS, EMA_STATE):
            if not (folder / name).is_file():
                raise InputError(f"checkpoint {folder} has no {name}: it was not written with train.ema on (or by "
                                 "an older cascade); resume with the settings it was made with or start a new --output")
        try:
            tensors = load_file(str(folder / EMA_WEIGHTS))
            state = json.loads((folder / EMA_STATE).read_text())
        except (SafetensorError, OSError, ValueError) as e:
            raise InputError(f"checkpoint {folder}: its EMA files cannot be read ({e.__class__.__name__})") from None
        shadow = [tensors.get(f"shadow.{i:06d}") for i in range(len(self.params))]
        if (len(tensors) != len(shadow) or any(s is None or s.shape != p.shape for s, p in zip(shadow, self.params))
                or not isinstance(state, dict) or any(not isinstance(state.get(k), type(getattr(self.model, k)))
                                                      for k in _COUNTERS)):
            raise InputError(f"checkpoint {folder}: its EMA does not match this run's trainable parameters")
        for k in _COUNTERS:
            setattr(self.model, k, state[k])
        self.model.cur_decay_value = state.get("last_decay")
        self.model.shadow_params = [s.to(self.device, torch.float32) for s in shadow]

    def metadata(self) -> dict:
        m = self.model
        return {"decay": m.decay, "start_step": m.update_after_step, "on_cpu": self.on_cpu,
                "optimization_steps": m.optimization_step, "last_decay": getattr(m, "cur_decay_value", None)}
