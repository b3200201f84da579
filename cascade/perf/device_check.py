"""The device check (`scripts/device_check.py`): a few training steps of every preset's stages, and of
each engine config one GPU can run, on random-initialised models, one JSON record per cell with
CUDA's `max_memory_allocated` beside the planner's figure for the same step, the step times and
whether the loss stayed finite.

Sizes: `real` builds the shipped IF architectures directly on the GPU (no download, no CPU init);
`tiny` builds the tiny stage models (32 px), so the whole check runs on CPU in the tests. Each cell
has a time budget; a cell that runs past it, or fails, is recorded as such and the check goes on.
The planner's traces are CPU work that can take minutes at real size: they run in a pool of worker
processes while the GPU runs the cells, and a plan not ready when the check's own budget ends is
recorded as missing (rerun with `--plans-wait`)."""
from __future__ import annotations

import json
import math
import multiprocessing
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from cascade.perf import arch, planner
from cascade.perf.step import synthetic_batch, train_step
from stages import activation_ckpt, setup
from stages.optimizers import factory, low_precision

PRESETS = ("if-xl", "if-l", "if-m")  # the goals are if-xl's: first, while the budget is fresh
ROOT = Path(__file__).resolve().parents[2]
ENGINE_CONFIGS = ROOT / "configs" / "accelerate"


@dataclass(frozen=True)
class Cell:
    name: str
    preset: str
    stage: int
    overrides: tuple[str, ...] = ()
    engine_config: str | None = None  # configs/accelerate/<name>.yaml, run through `accelerate launch`


def preset_cells() -> list[Cell]:
    """Every preset's two stages as shipped (if-l's stage II is if-xl's: run once), and the IF-I-XL LoRA
    of the 12 GB goal."""
    cells, seen = [], set()
    for preset in PRESETS:
        for stage in (1, 2):
            cfg = _config(Cell("", preset, stage))
            sec = cfg.stage1 if stage == 1 else cfg.stage2
            key = (cfg.models.stage1 if stage == 1 else cfg.models.stage2, json.dumps(asdict(sec.train), default=str))
            if key not in seen:
                seen.add(key)
                cells.append(Cell(f"{preset}-stage{stage}", preset, stage))
    return cells[:2] + [Cell("if-xl-stage1-lora8", "if-xl", 1, ("stage1.train.lora_rank=8",))] + cells[2:]


def engine_cells() -> list[Cell]:
    """Each shipped accelerate config at one process, with the if-xl stage II options (IF-II-L: the
    smaller real model keeps these cells inside the budget); ZeRO-Offload with the options it needs."""
    offload = ("stage2.train.offload_optimizer=true", "stage2.train.weights_dtype=float32",
               "stage2.train.use_8bit_adam=false", "stage2.train.optimizer_in_backward=false")
    plain = ("stage2.train.optimizer_in_backward=false",)  # refused by every engine but one process
    return [Cell(f"engine-{p.stem}", "if-xl", 2, offload if "offload" in p.stem else plain, p.stem)
            for p in sorted(ENGINE_CONFIGS.glob("*.yaml"))]


def _config(cell: Cell):
    from cascade.config import load_config

    return load_config(cell.preset, list(cell.overrides))


def plan_for(cell: Cell, size: str, batch: int | None) -> planner.Plan:
    from cascade.perf import planner_report

    cfg = _config(cell)
    plan = planner_report.plan_from_config(cfg, cell.stage, batch, cpu_run=not torch.cuda.is_available())
    if size == "tiny":
        plan = replace(plan, model=f"tiny-stage{cell.stage}", resolution=32, text_len=16)
    return plan


def _trace_peak(plan: planner.Plan) -> int:
    return planner.trace_step(plan)["bytes"]["peak"]


def _build(plan: planner.Plan, device: torch.device):
    dtype = getattr(torch, plan.weights_dtype)
    torch.manual_seed(0)
    if plan.model.startswith("tiny-stage"):
        from cascade.offline import tiny

        with arch.default_dtype(dtype):
            unet = tiny.build_stage1_unet() if plan.model.endswith("1") else tiny.build_stage2_unet()
        return unet.to(device)
    return arch.build_unet(plan.model, device=device, dtype=dtype)  # random init on the GPU itself


def run_cell(cell: Cell, plan: planner.Plan, steps: int, budget_s: float) -> dict:
    """`steps` training steps (the first one, which creates the optimizer state, is not timed) of the
    cell's options, in this process, on the device present."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t_start = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    unet = _build(plan, device)
    if plan.lora_rank:
        setup.add_lora(unet, plan.lora_rank, 0)
    activation_ckpt.apply(unet, plan.checkpointing)
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    sec = _config(cell).stage1 if cell.stage == 1 else _config(cell).stage2
    tc = replace(sec.train, max_grad_norm=0.0, gradient_accumulation_steps=1, fused_optimizer=device.type == "cuda")
    opt, opt_name = factory.build(params, tc)
    n = plan.batch * (2 if plan.prior else 1)
    gen = torch.Generator().manual_seed(0)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    times, losses = [], []
    for i in range(steps + 1):
        if time.perf_counter() - t_start > budget_s:
            break
        x, t, enc, labels = (v if v is None else v.to(device) for v in
                             synthetic_batch(unet.config, n, plan.text_len, generator=gen, resolution=plan.resolution))
        x, enc = low_precision.cast_for_model(unet, x, enc)
        _sync(device)
        t0 = time.perf_counter()
        loss = train_step(unet, opt, (x, t, enc, labels), autocast)
        _sync(device)
        if i:
            times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    out = {"optimizer": opt_name, "steps_run": len(losses), "loss": losses,
           "loss_finite": all(math.isfinite(v) for v in losses) if losses else None,
           "step_s": times, "step_s_median": statistics.median(times) if times else None,
           "max_memory_allocated": torch.cuda.max_memory_allocated() if device.type == "cuda" else None,
           "wall_s": time.perf_counter() - t_start}
    del unet, opt, params
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def saved_dtypes(device: torch.device, emulate: bool) -> list[tuple]:
    """(shape, dtype) of every tensor autograd saves in one bf16-autocast forward of the tiny stage I
    UNet (fp32 weights), on `device`; `emulate`: CPU autocast with the planner's CUDA rules."""
    from cascade.offline import tiny
    from cascade.perf.cuda_autocast import cuda_rules

    torch.manual_seed(0)
    unet = tiny.build_stage1_unet().to(device).train()
    x, t, enc, labels = (v if v is None else v.to(device) for v in
                         synthetic_batch(unet.config, 2, 16, generator=torch.Generator().manual_seed(0), resolution=32))
    saved = []
    with cuda_rules(emulate), torch.autograd.graph.saved_tensors_hooks(
            lambda v: saved.append((tuple(v.shape), str(v.dtype))) or v, lambda v: v), \
            torch.autocast(device.type, dtype=torch.bfloat16):
        unet(x, t, encoder_hidden_states=enc, class_labels=labels, return_dict=False)
    return saved


def autocast_check() -> dict:
    """The planner's CUDA-rule emulation (CPU) against real CUDA autocast: the same saved tensors?"""
    if not torch.cuda.is_available():
        return {"status": "skipped: no CUDA device", "emulated_saved": len(saved_dtypes(torch.device("cpu"), True))}
    real, emulated = saved_dtypes(torch.device("cuda"), False), saved_dtypes(torch.device("cpu"), True)
    mismatched = [(a, b) for a, b in zip(real, emulated) if a != b]
    return {"status": "ran", "real_saved": len(real), "emulated_saved": len(emulated),
            "same": len(real) == len(emulated) and not mismatched, "first_mismatches": mismatched[:10],
            "real_bytes": _bytes(real), "emulated_bytes": _bytes(emulated)}


def _bytes(saved: list[tuple]) -> int:
    return sum(math.prod(shape) * getattr(torch, dtype.split(".")[-1]).itemsize for shape, dtype in saved)


def run_engine_cell(cell: Cell, size: str, steps: int, budget_s: float) -> dict:
    """The cell in a fresh process launched as the user launches training (`accelerate launch
    --config_file configs/accelerate/<engine>.yaml --num_processes 1`); a CPU run launches the same
    module without accelerate (one plain process), so only the DDP config is meaningful there."""
    args = ["-m", "cascade.perf.device_engine", json.dumps({"cell": asdict(cell), "size": size, "steps": steps})]
    if torch.cuda.is_available():
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ENGINE_CONFIGS / f"{cell.engine_config}.yaml"), "--num_processes", "1", *args]
    else:
        cmd = [sys.executable, *args]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=budget_s, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"status": "timed out", "wall_s": time.perf_counter() - t0}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("DEVICE_CHECK ")]
    if proc.returncode != 0 or not lines:
        return {"status": "failed", "returncode": proc.returncode, "stderr_tail": proc.stderr[-2000:],
                "wall_s": time.perf_counter() - t0}
    return {"status": "ran", **json.loads(lines[-1][len("DEVICE_CHECK "):]), "wall_s": time.perf_counter() - t0}


def check(size: str = "real", steps: int = 3, cell_budget_s: float = 45.0, engine_budget_s: float = 90.0,
          total_budget_s: float = 420.0, engines: bool = True, plans: bool = True, plans_wait: float | None = None,
          batch: int | None = None, only: list[str] | None = None) -> dict:
    """Run every cell; {"device", "size", "cells": [...]} with each cell's measured peak against its plan."""
    from cascade.perf.bench import device_name, git_revision, versions

    t0 = time.perf_counter()
    cells = preset_cells() + (engine_cells() if engines else [])
    if only:
        cells = [c for c in cells if c.name in only]
    plans_by_cell = {c.name: plan_for(c, size, batch) for c in cells}
    # spawned before any CUDA work (a forked CUDA context is unusable); the traces are CPU-only
    pool = ProcessPoolExecutor(min(8, len(cells)), mp_context=multiprocessing.get_context("spawn")) if plans else None
    futures = {name: pool.submit(_trace_peak, p) for name, p in plans_by_cell.items()} if pool else {}
    records = []
    for cell in cells:
        left = total_budget_s - (time.perf_counter() - t0)
        rec = {"cell": cell.name, "preset": cell.preset, "stage": cell.stage, "overrides": list(cell.overrides),
               "engine_config": cell.engine_config, "plan": asdict(plans_by_cell[cell.name])}
        if left < 5:
            rec.update(status="skipped: the check's time budget is spent")
        elif cell.engine_config:
            rec.update(run_engine_cell(cell, size, steps, min(engine_budget_s, left)))
        else:
            try:
                rec.update(run_cell(cell, plans_by_cell[cell.name], steps, min(cell_budget_s, left)))
                rec["status"] = "ran" if rec["steps_run"] == steps + 1 else "ran out of its time budget"
            except torch.cuda.OutOfMemoryError as e:  # a plan that says "fits" and is wrong shows here
                rec.update(status="out of memory", error=str(e).splitlines()[0])
            except Exception as e:  # noqa: BLE001 - one cell's failure is its record, the check goes on
                rec.update(status="failed", error=f"{type(e).__name__}: {e}"[:500])
        records.append(rec)
    wait_until = time.perf_counter() + (plans_wait if plans_wait is not None
                                        else max(0.0, total_budget_s - (time.perf_counter() - t0)))
    for rec in records:
        if rec["cell"] not in futures:
            continue
        try:
            rec["planned_peak"] = futures[rec["cell"]].result(timeout=max(0.0, wait_until - time.perf_counter()))
        except TimeoutError:
            rec["planned_peak"], rec["plan_missing"] = None, "the trace did not finish within the budget"
        except Exception as e:  # noqa: BLE001 - a trace that fails leaves this cell without a plan, says why
            rec["planned_peak"], rec["plan_missing"] = None, f"{type(e).__name__}: {e}"[:300]
        if rec.get("planned_peak") and rec.get("max_memory_allocated"):
            rec["measured_over_planned"] = rec["max_memory_allocated"] / rec["planned_peak"]
    if pool:
        pool.shutdown(wait=False, cancel_futures=True)
    return {"device": device_name(), "size": size, "steps": steps, "versions": versions(), "git": git_revision(),
            "autocast_emulation": autocast_check(), "wall_s": time.perf_counter() - t0, "cells": records}
