"""What the trainer does with one validation: the grid into samples/step-NNNNNN.png and the trackers,
the scalars into validation.csv and the trackers; and the run's plots, drawn once at the end (loss
and, when measured, the validation scalars beside it) instead of at every checkpoint.

The images come from the stage's own validation or from a callback the caller hands in (the cascade
chains stage I -> stage II there); a stage never builds another stage itself."""
from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from stages import data


@dataclass
class ValidationResult:
    images: torch.Tensor  # [N, 3, H, W] in [-1, 1], drawn as a grid
    columns: int | None = None
    scalars: dict = field(default_factory=dict)  # measure name -> float (fidelity, drift, ...)


def write(accelerator, run_dir: Path, step: int, result: ValidationResult) -> dict:
    """Main process: grid file, trackers; returns the row {"step", **scalars} for validation.csv."""
    folder = run_dir / "samples"
    folder.mkdir(exist_ok=True)
    grid = data.grid(data.to_pil(result.images), cols=result.columns)
    tmp = folder / f"step-{step:06d}.tmp.png"
    grid.save(tmp)
    os.replace(tmp, folder / f"step-{step:06d}.png")
    row = {"step": step, **{k: float(v) for k, v in result.scalars.items()}}
    if accelerator.trackers:
        _log_trackers(accelerator, step, grid, row)
    return row


def _log_trackers(accelerator, step: int, grid, row: dict):
    import numpy as np

    scalars = {f"validation/{k}": v for k, v in row.items() if k != "step" and math.isfinite(v)}
    if scalars:
        accelerator.log(scalars, step=step)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({"validation": np.asarray(grid)[None]}, step=step, dataformats="NHWC")
        elif tracker.name == "wandb":
            tracker.log_images({"validation": [grid]}, step=step)


def write_csv(path: Path, rows: list[dict]):
    """Atomic; the columns are the union of the rows' keys (a measure may appear later)."""
    if not rows:
        return
    keys = list(dict.fromkeys(k for r in rows for k in r))
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, restval="")
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def plot(path: Path, losses: list[dict], validation: list[dict], best_step: int | None = None,
         budget: float | None = None, title: str = ""):
    """Loss on the left; the validation scalars beside it, the drift budget and the chosen step marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(k for r in validation for k in r if k != "step"))
    unit = [n for n in names if all(0 <= r.get(n, 0) <= 1 for r in validation)]  # fractions, cosines
    groups = [g for g in (unit, [n for n in names if n not in unit]) if g]
    fig, axes = plt.subplots(1, 1 + len(groups), figsize=(4.6 * (1 + len(groups)), 3.4), squeeze=False)
    ax = axes[0][0]
    steps = [r["step"] for r in losses]
    ax.plot(steps, [r["instance_loss"] for r in losses], label="instance loss", lw=0.8)
    if any(r.get("prior_loss", "") != "" for r in losses):
        ax.plot(steps, [r["prior_loss"] if r["prior_loss"] != "" else math.nan for r in losses], label="prior loss",
                lw=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    vsteps = [r["step"] for r in validation]
    for ax, group in zip(axes[0][1:], groups):
        for name in group:
            ax.plot(vsteps, [r.get(name, math.nan) for r in validation], marker="o", ms=3, label=name)
        if budget is not None and math.isfinite(budget) and group is unit:
            ax.axhline(budget, color="grey", ls=":", lw=1, label=f"drift budget {budget:g}")
        if best_step is not None:
            ax.axvline(best_step, color="k", ls="--", lw=1, label=f"chosen step {best_step}")
        ax.set_xlabel("step")
        ax.set_ylabel("validation measure")
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, path)
