"""The running cells of cascade/compat.py's table train 2 steps of the tiny stage I on their real engine
(gloo: torchrun with 2 processes for the engines, in-process for one process), and each update matches a
one-process run of the library's own optimizer (torch AdamW, bitsandbytes AdamW8bit, Prodigy, Adafactor)
on the same gradients, so an optimizer silently swapped by an engine fails.

The default suite trains a covering set (every pair of option values that some running cell has appears
in one trained cell); `pytest -m slow tests/test_compat_train.py` walks every running cell CPU can run."""
from __future__ import annotations

import dataclasses
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cascade import compat
from tests.conftest import free_port

HELPER = Path(__file__).parent / "helpers" / "compat_cells.py"
# 1e-2: a step of several 16-bit ulps, so the rounding of 16-bit weights stays small beside it
LR = {"adamw": 1e-2, "adamw8bit": 1e-2, "prodigy": 1.0, "adafactor": 1e-2}


def on_cpu(cell: compat.Cell, offload: bool) -> bool:
    """fp16 mixed precision needs CUDA (the trainer falls back to fp32 with a warning, so such a cell would
    not test what it names). ZeRO-Offload's DeepSpeedCPUAdam runs on CPU but builds its C++ op on first
    use (6 minutes here, then cached): only the slow walk takes the offload cells."""
    offloaded = cell.offload or cell.engine == "zero2-offload"
    return cell.mixed_precision != "fp16" and (offload or not offloaded)


def running_cells(offload: bool = False) -> list[compat.Cell]:
    return [c for c, why in compat.table() if why is None and on_cpu(c, offload)]


def covering_set(cells: list[compat.Cell]) -> list[compat.Cell]:
    """Greedy pairwise cover: every (axis=value, axis=value) pair found among `cells` is in a chosen cell."""
    axes = list(compat.AXES)

    def pairs(c):
        return {((a, getattr(c, a)), (b, getattr(c, b))) for a, b in itertools.combinations(axes, 2)}

    todo = set().union(*map(pairs, cells))
    chosen = []
    while todo:
        best = max(cells, key=lambda c: len(pairs(c) & todo))
        chosen.append(best)
        todo -= pairs(best)
    return chosen


def sets_of(cell: compat.Cell) -> list[str]:
    t = "stage1.train."
    return [f"{t}optimizer={cell.optimizer}", f"{t}learning_rate={LR[cell.optimizer]}",
            f"{t}weights_dtype={cell.weights}", f"{t}optimizer_states={cell.states}",
            f"{t}optimizer_in_backward={str(cell.in_backward).lower()}",
            f"{t}offload_optimizer={str(cell.offload).lower()}",
            f"{t}lora_rank={0 if cell.adapter == 'none' else 4}",
            f"{t}lora_type={'lora' if cell.adapter == 'none' else cell.adapter}",
            f"{t}ema={str(cell.ema).lower()}", f"{t}mixed_precision={cell.mixed_precision}"]


BNB_REFERENCE = "single-bitsandbytes"  # a reference's engine label: one process, bitsandbytes' 8-bit AdamW


def reference_of(cell: compat.Cell) -> compat.Cell:
    """One process, fp32 states, no in-backward or offload; the rest as the cell. bf16 weights too (torch's
    AdamW then rounds to nearest, cascade stochastically); fp16 weights are compared with fp32 ones, since
    torch's AdamW on fp16 weights diverges at step 2 (its eps 1e-8 is below fp16's range). 8-bit AdamW under
    DeepSpeed is bitsandbytes' even where torchao is installed (factory.make_8bit), and so is its reference
    (against torchao's the fp32 ZeRO cells read 0.049-0.050, against bitsandbytes' 0.020-0.022)."""
    weights = "float32" if cell.weights == "float16" else cell.weights
    engine = BNB_REFERENCE if cell.optimizer == "adamw8bit" and cell.engine in compat.DEEPSPEED \
        and compat.installed("torchao") else "single"
    return compat.Cell(engine, cell.optimizer, weights, "fp32", False, False, cell.adapter, cell.ema,
                       cell.mixed_precision)


def name_of(cell: compat.Cell, reference=False) -> str:
    return ("ref-" if reference else "") + "-".join(str(v).lower() for v in compat.as_dict(cell).values())


def _launch(jobs: list[dict], common: list[str], out: Path, processes: int, torchrun: bool = False):
    out.mkdir(parents=True, exist_ok=True)
    spec = out / f"jobs-{processes}.json"
    spec.write_text(json.dumps({"common": common, "out": str(out), "jobs": jobs}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "DS_BUILD_OPS": "0"}
    if processes == 1 and not torchrun:
        cmd = [sys.executable, str(HELPER), str(spec)]
    else:
        cmd = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", str(processes),
               "--master_port", str(free_port()), str(HELPER), str(spec)]
    # a launch runs its jobs one after another: fp16 cells take ~30 s each on CPU, the slow walk's launches 150+ jobs
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=max(3000, 120 * len(jobs)))
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-4000:]
    results = json.loads((out / "results.json").read_text())
    (out / "results.json").rename(out / f"results-{processes}.json")
    return results, text


def _trained(run: Path) -> dict[str, torch.Tensor]:
    """The export's trained tensors in fp32: the UNet, or the LoRA up/B matrices (zero at the start)."""
    from safetensors.torch import load_file

    found = {}
    for f in sorted((run / "export").rglob("*.safetensors")):
        if "scheduler" in f.parts:
            continue
        for k, v in load_file(str(f)).items():
            if "lora" not in f.name or "lora_B" in k or "lora.up" in k:
                found[f"{f.name}:{k}"] = v.float()
    return found


def _base(cache: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    sd = load_file(str(cache / "tiny-v1" / "stage1" / "unet" / "diffusion_pytorch_model.safetensors"))
    return {f"diffusion_pytorch_model.safetensors:{k}": v.float() for k, v in sd.items()}


def common_args(subject: Path, cache: Path, checkpoint_every: int = 2) -> list[str]:
    """The arguments every job of a walk shares: 2 steps of the tiny stage I, no prior, no validation."""
    return ["--subject", str(subject), "--class-noun", "dog", "--max-steps", "2",
            "--set", f"models.cache_dir={cache}", "--set", "stage1.train.prior_preservation=false",
            "--set", "stage1.train.validation_images=0", "--set", f"stage1.train.checkpoint_every={checkpoint_every}",
            "--set", "stage1.train.max_grad_norm=0", "--set", "stage1.train.lr_warmup_steps=0",
            "--set", "stage1.train.weight_decay=0.1", "--set", "stage1.train.ema_decay=0.5",
            "--set", "stage1.train.batch_size=1", "--set", "distributed_timeout_minutes=2"]


def walk(cells: list[compat.Cell], subject: Path, cache: Path, out: Path, engine_processes: int = 2,
         checkpoint_every: int = 2) -> dict:
    """Train `cells` and their references; {cell: relative update error}. The engine cells run under torchrun
    with `engine_processes` processes."""
    common = common_args(subject, cache, checkpoint_every)
    refs = sorted({reference_of(c) for c in cells}, key=name_of)
    one = [{"name": name_of(r, True), "engine": "single", "sets": sets_of(r), "reference": True,
            "library": "bitsandbytes" if r.engine == BNB_REFERENCE else None} for r in refs]
    one += [{"name": name_of(c), "engine": "single", "sets": sets_of(c)} for c in cells if c.engine == "single"]
    many = [{"name": name_of(c), "engine": c.engine, "sets": sets_of(c)} for c in cells if c.engine != "single"]
    results = _launch(one, common, out, 1)[0]
    if many:
        results.update(_launch(many, common, out, engine_processes, torchrun=True)[0])
    assert all(rc == 0 for rc in results.values()), {k: v for k, v in results.items() if v}
    base = _base(cache)
    errors, swaps = {}, {}
    for cell in cells:
        got, ref = _trained(out / name_of(cell)), _trained(out / name_of(reference_of(cell), True))
        assert got.keys() == ref.keys() and ref, cell
        errors[cell] = _error(got, ref, base)
        # the error a swap to another optimizer would show: the other references of the same settings
        # (AdamW and 8-bit AdamW take the same first steps, ~lr x sign(g), so they are not told apart)
        for other in refs:
            if other != reference_of(cell) and dataclasses.replace(other, optimizer=cell.optimizer) == reference_of(cell) \
                    and {other.optimizer, cell.optimizer} != {"adamw", "adamw8bit"} and tolerance(cell) < 0.5:
                swaps[(cell, other.optimizer)] = _error(_trained(out / name_of(other, True)), ref, base)
    return errors, swaps


def _error(got: dict, ref: dict, base: dict) -> float:
    """|got - ref| / |ref - start| over the trained tensors (LoRA B starts at zero)."""
    start = {k: base.get(k, torch.zeros_like(v)) for k, v in ref.items()}
    moved = sum(((ref[k] - start[k]) ** 2).sum() for k in ref).sqrt()
    assert moved > 0
    return float(sum(((got[k] - ref[k]) ** 2).sum() for k in ref).sqrt() / moved)


def tolerance(cell: compat.Cell) -> float:
    """Relative update error allowed against the reference: the reduction order's float rounding for fp32
    cells; with 16-bit weights, bf16 moments or bf16 autocast also the rounding (stochastic against
    nearest) and the engines' own bf16 numerics (DeepSpeed casts the module, FSDP2 has its own policy),
    which flip the sign of Adam's first, ~lr x sign(g), step where a gradient is near zero. A swap to
    another optimizer (Adafactor, Prodigy) shows 0.5 and above (measured in `walk`)."""
    if cell.weights == "float16":  # against fp32 weights: the fp16 forward's own gradients (measured 0.33-0.35)
        return 0.5
    if cell.weights != "float32" or cell.states != "fp32" or cell.mixed_precision == "bf16":
        return 0.25
    return 0.05


def _check(errors: dict, swaps: dict, need_swaps: bool = True):
    bad = {name_of(c): round(e, 4) for c, e in errors.items() if not e < tolerance(c)}
    assert not bad, bad
    # the comparison tells the optimizers apart: a swapped one would fail
    blind = {f"{name_of(c)} as {o}": round(e, 4) for (c, o), e in swaps.items() if not e > tolerance(c)}
    assert (swaps or not need_swaps) and not blind, blind


def test_covering_set_covers_every_pair_of_running_values():
    cells = running_cells()
    chosen = covering_set(cells)
    for a, b in itertools.combinations(compat.AXES, 2):
        seen = {(getattr(c, a), getattr(c, b)) for c in cells}
        assert seen == {(getattr(c, a), getattr(c, b)) for c in chosen}, (a, b)
    assert len(chosen) < 40 and all(compat.verdict(c) is None for c in chosen)


def test_covering_set_trains_and_matches_the_reference_optimizers(tiny, cache_dir, subject_dir, tmp_path):
    pytest.importorskip("deepspeed", reason="the ZeRO cells need DeepSpeed (pip install 'cascade-dreambooth[deepspeed]')")
    t0 = time.time()
    errors, swaps = walk(covering_set(running_cells()), subject_dir, cache_dir, tmp_path)
    print(f"covering set: {len(errors)} cells in {time.time() - t0:.0f} s; worst error {max(errors.values()):.3g}, "
          f"smallest swap error {min(swaps.values()):.3g}")
    _check(errors, swaps)


@pytest.mark.slow
def test_every_running_cell_trains_and_matches_the_reference_optimizers(tiny, cache_dir, subject_dir, tmp_path):
    pytest.importorskip("deepspeed")
    t0 = time.time()
    errors, swaps = walk(running_cells(offload=True), subject_dir, cache_dir, tmp_path)
    print(f"full walk: {len(errors)} cells in {time.time() - t0:.0f} s; worst error {max(errors.values()):.3g}")
    _check(errors, swaps)


@pytest.mark.slow
def test_offloaded_adamw_matches_torch_adamw(tiny, cache_dir, subject_dir, tmp_path):
    """ZeRO-Offload runs DeepSpeedCPUAdam whatever the optimizer: the one it may run, plain AdamW, must
    take torch AdamW's decoupled-decay update (slow: DeepSpeed builds its CPU Adam op on first use)."""
    pytest.importorskip("deepspeed")
    cells = [c for c in running_cells(offload=True) if (c.offload or c.engine == "zero2-offload")
             and c.mixed_precision == "no" and not c.ema]
    t0 = time.time()
    errors, swaps = walk(cells, subject_dir, cache_dir, tmp_path)
    print(f"offload: {len(errors)} cells in {time.time() - t0:.0f} s; worst error {max(errors.values()):.3g}")
    _check(errors, swaps, need_swaps=False)  # every reference here is AdamW
