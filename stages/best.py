"""The best checkpoint by a measured trade-off: the validation step with the highest fidelity whose
drift stays within a budget. The rule is decided online (a step becomes the best when it is
eligible and strictly beats the best so far; ties keep the earlier, less-trained step), which picks
the same step as `choose` over the whole series. Each new best's trainable weights are written to disk
(`best/step-NNNNNN.safetensors`, atomic) and the record of the best rides in every checkpoint, so a
run resumed from any checkpoint finds the weights its record names; the others are removed once the
export has taken the chosen ones."""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

RECORD = "best.json"


def weights_file(step: int) -> str:
    return f"step-{step:06d}.safetensors"


@dataclass(frozen=True)
class BestRule:
    fidelity: str = "fidelity"  # the validation scalar to maximise
    drift: str = "drift"  # the validation scalar that must stay <= budget
    budget: float = math.inf

    def eligible(self, row: dict) -> bool:
        f, d = row.get(self.fidelity), row.get(self.drift)
        return _finite(f) and _finite(d) and d <= self.budget

    def describe(self, row: dict) -> str:
        return (f"step {row['step']}: highest {self.fidelity} ({row[self.fidelity]:.4g}) among validation steps "
                f"whose {self.drift} <= {self.budget:g} (its {self.drift} {row[self.drift]:.4g})")


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def choose(rows: list[dict], rule: BestRule) -> dict | None:
    """The row (a validation step's scalars with "step") the rule picks, or None when no row is
    within the budget."""
    best = None
    for row in rows:
        if rule.eligible(row) and (best is None or row[rule.fidelity] > best[rule.fidelity]):
            best = row
    return best


class Keeper:
    """Follows the validation series; saves the trainable weights whenever a new best appears."""

    def __init__(self, rule: BestRule, folder: Path, record: dict | None = None):
        self.rule, self.folder = rule, Path(folder)
        self.record = record  # {"step", fidelity key, drift key, "reason"} of the best so far

    def offer(self, row: dict, model) -> bool:
        """Main process: `row` is the validation step's scalars; returns True when it is the new best."""
        best = self.record
        if not self.rule.eligible(row) or (best is not None and row[self.rule.fidelity] <= best[self.rule.fidelity]):
            return False
        save_trainable(model, self.folder / weights_file(row["step"]))
        self.record = {"step": row["step"], self.rule.fidelity: row[self.rule.fidelity],
                       self.rule.drift: row[self.rule.drift], "budget": self.rule.budget,
                       "reason": self.rule.describe(row)}
        tmp = self.folder / (RECORD + ".tmp")
        tmp.write_text(json.dumps(self.record, indent=2))
        os.replace(tmp, self.folder / RECORD)
        return True

    def restore(self, model) -> dict | None:
        """Every process: load the best step's trainable weights into `model` (unwrapped); returns the record
        (None when no step was within the budget: the model keeps its final weights)."""
        if self.record is None:
            return None
        load_trainable(model, self.folder / weights_file(self.record["step"]))
        return self.record

    def prune(self):
        """Main process, after the export: keep only the chosen step's weights."""
        keep = weights_file(self.record["step"]) if self.record else None
        for f in self.folder.glob("step-*.safetensors"):
            if f.name != keep:
                f.unlink()


def trainable_state(model) -> dict:
    return {n: p.detach().to("cpu", copy=True).contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_trainable(model, path: Path):
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(trainable_state(model), str(tmp))
    os.replace(tmp, path)


def load_trainable(model, path: Path):
    from safetensors.torch import load_file

    state = load_file(str(path))
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in state]
    if missing or any(n not in params for n in state):
        raise RuntimeError(f"{path}: best-checkpoint weights do not match the model (missing {missing[:3]})")
    with torch.no_grad():
        for n, v in state.items():
            params[n].copy_(v.to(params[n].device, params[n].dtype))
