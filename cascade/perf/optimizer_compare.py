"""Our low-precision AdamW against torchao's and bitsandbytes' on CPU, on the same gradients.

Every variant steps the same parameter set (a few 1024x1024 matrices at |w| ~ 0.03, IF's typical
weight, plus a conv kernel, a bias and a tensor whose size is not a multiple of 256) through the
same gradient sequence (a fixed mean plus noise, drawn per step from a seeded generator, 10x smaller
in the second half). Against torch's fp32 AdamW from the same starting values it reports:
- the update's relative error ||dW - dW_ref|| / ||dW_ref|| after 1 and N steps, and the fraction
  of the reference update it learned (<dW, dW_ref> / ||dW_ref||^2: 1 = all of it, in expectation);
- bytes of optimizer state per parameter (quantised moments counted through their inner tensors);
- resume: the state dict saved with torch.save and loaded with torch.load(weights_only=True), with
  torch's global RNG saved beside it as accelerate's checkpoint does; the next two steps must be
  bit-identical to the uninterrupted run's. "plain" says whether the state dict holds only plain
  tensors, numbers and strings (what our checkpoints may hold);
- step time (median after the first step; the first, which includes torchao's compile, apart).
The update-to-ulp regime of docs/precision.md (lr 1e-7 on bf16 weights, ~1e-3 ulp a step) and the
bf16 second moment after a gradient drop (docs/precision.md, issue 19) are measured apart."""
from __future__ import annotations

import math
import statistics
import tempfile
import time
from pathlib import Path

import torch

from stages.optimizers import torchao_lowbit
from stages.optimizers.low_precision import LowPrecisionAdamW, _State8bit


def param_set(matrices: int = 3, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(1024, 1024)] * matrices + [(320, 4, 3, 3), (1280,), (4000,)]
    return [torch.randn(s, generator=g) * 0.03 for s in shapes]


def gradient(shape, step: int, steps: int, mean: torch.Tensor) -> torch.Tensor:
    """The step's gradient: a fixed mean plus unit noise, x1e-3, and 10x smaller in the second half."""
    g = torch.Generator().manual_seed(1_000 + step)
    scale = 1e-3 if step < steps // 2 else 1e-4
    return (0.5 * mean + torch.randn(shape, generator=g)) * scale


# name -> (weights dtype, path, builder(params, lr)); torch's fp32 AdamW is the reference of both dtypes
def _bnb(params, lr):
    import bitsandbytes as bnb

    return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=0.0)


def _ao(kind, sr=True):
    return lambda params, lr: torchao_lowbit.make(params, lr=lr, states=kind, bf16_stochastic_round=sr)


def _ao_bf16_states(params, lr):
    from torchao.optim import _AdamW

    return _AdamW(params, lr=lr, weight_decay=0.0, bf16_stochastic_round=True)


def _ours(rounding, states):
    return lambda params, lr: LowPrecisionAdamW(params, lr=lr, weight_decay=0.0, rounding=rounding, states=states)


def _torch(params, lr):
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, foreach=False)


VARIANTS = {
    "torch AdamW (fp32 reference)": ("float32", "reference", _torch),
    "ours: bf16 states": ("float32", "bf16 states", _ours("nearest", "bf16")),
    "ours: 8-bit states": ("float32", "8-bit states", _ours("nearest", "8bit")),
    "bitsandbytes AdamW8bit": ("float32", "8-bit states", _bnb),
    "torchao AdamW8bit": ("float32", "8-bit states", _ao("8bit")),
    "torchao AdamW4bit": ("float32", "4-bit states", _ao("4bit")),
    "torchao AdamWFp8": ("float32", "fp8 states", _ao("fp8")),
    "torch AdamW on bf16 weights": ("bfloat16", "bf16 weights, nearest", _torch),
    "ours: bf16 SR, fp32 states": ("bfloat16", "bf16 SR", _ours("stochastic", "fp32")),
    "ours: bf16 SR, bf16 states": ("bfloat16", "bf16 SR", _ours("stochastic", "bf16")),
    "ours: bf16 SR, 8-bit states": ("bfloat16", "bf16 SR + 8-bit states", _ours("stochastic", "8bit")),
    "ours: bf16 Kahan, fp32 states": ("bfloat16", "bf16 Kahan", _ours("kahan", "fp32")),
    "torchao _AdamW bf16 SR (bf16 states)": ("bfloat16", "bf16 SR", _ao_bf16_states),
    "torchao AdamW8bit bf16 SR": ("bfloat16", "bf16 SR + 8-bit states", _ao("8bit")),
    "torchao AdamW4bit bf16 SR": ("bfloat16", "bf16 SR + 4-bit states", _ao("4bit")),
    "bitsandbytes AdamW8bit on bf16 weights": ("bfloat16", "bf16 weights + 8-bit states", _bnb),
}


def _walk(v, out: dict, plain: list):
    """Every tensor held (by id) and whether everything is a plain tensor, number, string or container."""
    if isinstance(v, torch.Tensor):
        if type(v) is not torch.Tensor and hasattr(v, "__tensor_flatten__"):
            plain[0] = False
            for n in v.__tensor_flatten__()[0]:
                _walk(getattr(v, n), out, plain)
        else:
            out.setdefault(id(v), v)
    elif isinstance(v, dict):
        for x in v.values():
            _walk(x, out, plain)
    elif isinstance(v, (list, tuple)):
        for x in v:
            _walk(x, out, plain)
    elif isinstance(v, _State8bit):
        for t in v.to_tensors().values():
            _walk(t, out, plain)
    elif not isinstance(v, (int, float, str, bool, type(None), torch.dtype)):
        plain[0] = False


def state_bytes(opt) -> int:
    found: dict = {}
    for st in opt.state.values():
        _walk(st, found, [True])
    return sum(t.numel() * t.element_size() for t in found.values())


def is_plain(state_dict) -> bool:
    plain = [True]
    _walk(state_dict, {}, plain)
    return plain[0]


def _flat_delta(ws, w0) -> torch.Tensor:
    return torch.cat([(w.detach().float() - a.float()).reshape(-1) for w, a in zip(ws, w0)])


def _update_stats(delta: torch.Tensor, ref: torch.Tensor) -> dict:
    rn = ref.norm().item()
    return {"rel_error": (delta - ref).norm().item() / rn, "learned_fraction": (delta @ ref).item() / rn ** 2,
            "frac_weights_changed": (delta != 0).float().mean().item()}


def run_variant(build, dtype: str, start, steps: int, lr: float, resume_at: int | None = None, means=None) -> dict:
    """Step a fresh copy of `start` (cast to `dtype`) through the gradient sequence. Returns the weight
    trajectory at steps 1 and N, timings, state bytes and the resume check."""
    dt = getattr(torch, dtype)
    params = [torch.nn.Parameter(w.to(dt).clone()) for w in start]
    w0 = [p.detach().clone() for p in params]
    opt = build(params, lr)
    times, out, saved, after = [], {}, None, {}
    tmp = Path(tempfile.mkdtemp(prefix="optcmp-"))
    for step in range(steps):
        if resume_at is not None and step == resume_at:
            torch.save({"opt": opt.state_dict(), "rng": torch.get_rng_state()}, tmp / "state.pt")
            saved = [p.detach().clone() for p in params]
            out["plain_state_dict"] = is_plain(opt.state_dict())
        for p, m in zip(params, means):
            p.grad = gradient(p.shape, step, steps, m).to(dt)
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
        if step == 0:
            out["delta1"] = _flat_delta(params, w0)
        if resume_at is not None and step in (resume_at, resume_at + 1):
            after[step] = [p.detach().clone() for p in params]
    out["deltaN"] = _flat_delta(params, w0)
    out["state_bytes_per_param"] = state_bytes(opt) / sum(p.numel() for p in params)
    out["first_step_s"] = times[0]
    out["step_s_median"] = statistics.median(times[1:]) if len(times) > 1 else times[0]
    if saved is not None:
        out["resume_bit_identical"] = _resume_check(build, dt, saved, tmp / "state.pt", resume_at, steps, lr, means,
                                                    after)
    (tmp / "state.pt").unlink(missing_ok=True)
    tmp.rmdir()
    return out


def _resume_check(build, dt, saved, path, k, steps, lr, means, after) -> bool | str:
    params = [torch.nn.Parameter(w.clone()) for w in saved]
    opt = build(params, lr)
    try:
        blob = torch.load(path, weights_only=True)
        opt.load_state_dict(blob["opt"])
    except Exception as e:  # noqa: BLE001 - the library's own refusal is the finding
        return f"load failed: {e.__class__.__name__}: {str(e).splitlines()[0][:120]}"
    rng = torch.get_rng_state()
    torch.set_rng_state(blob["rng"])
    ok = True
    for step in (k, k + 1):
        for p, m in zip(params, means):
            p.grad = gradient(p.shape, step, steps, m).to(dt)
        opt.step()
        ok = ok and all(torch.equal(p.detach(), a) for p, a in zip(params, after[step]))
    torch.set_rng_state(rng)
    return ok


def compare(names, start, steps: int, lr: float, resume: bool = True, seed: int = 0) -> list[dict]:
    """Each named variant against torch's fp32 AdamW on the same gradients, from the same values (the
    bf16 variants' reference starts from the bf16-rounded values)."""
    means = [torch.randn(w.shape, generator=torch.Generator().manual_seed(seed + i)) for i, w in enumerate(start)]
    refs, rows = {}, []
    for name in names:
        dtype, path, build = VARIANTS[name]
        base = [w.to(getattr(torch, dtype)).float() for w in start]
        if dtype not in refs:
            refs[dtype] = run_variant(_torch, "float32", base, steps, lr, means=means)
        torch.manual_seed(seed)  # the global RNG torchao's rounding draws from
        try:
            r = run_variant(build, dtype, start, steps, lr, resume_at=steps // 2 if resume else None, means=means)
        except Exception as e:  # noqa: BLE001 - a variant the library cannot run here is a result
            rows.append({"variant": name, "weights": dtype, "path": path,
                         "error": f"{e.__class__.__name__}: {str(e).splitlines()[0][:160]}"})
            continue
        ref = refs[dtype]
        row = {"variant": name, "weights": dtype, "path": path}
        row.update({f"{k}_step1": v for k, v in _update_stats(r.pop("delta1"), ref["delta1"]).items()
                    if k != "frac_weights_changed"})
        row.update({f"{k}_stepN": v for k, v in _update_stats(r.pop("deltaN"), ref["deltaN"]).items()})
        row.update(r)
        rows.append(row)
    return rows


def second_moment_after_drop(steps: int = 2500, n: int = 8192) -> list[dict]:
    """docs/precision.md's frozen-v check: bf16 moments written with round-to-nearest stop decaying
    after a 10x gradient drop (v moves 1e-3 of itself a step, under bf16's half-ulp)."""
    names = {"ours: bf16 SR, bf16 states": ("v", _ours("stochastic", "bf16")),
             "torchao _AdamW bf16 SR (bf16 states)": ("exp_avg_sq", _ao_bf16_states),
             "torchao AdamW8bit bf16 SR": ("exp_avg_sq", _ao("8bit")),
             "torch AdamW on bf16 weights": ("exp_avg_sq", _torch)}
    ref_p = torch.nn.Parameter(torch.zeros(n))
    ref = _torch([ref_p], 1e-6)
    runs = {k: (key, torch.nn.Parameter(torch.zeros(n, dtype=torch.bfloat16))) for k, (key, _) in names.items()}
    opts = {k: names[k][1]([p], 1e-6) for k, (_, p) in runs.items()}
    g = torch.Generator().manual_seed(0)
    for step in range(steps):
        grad = torch.randn(n, generator=g) * (1.0 if step < 300 else 0.1)
        ref_p.grad = grad.clone()
        ref.step()
        for k, (_, p) in runs.items():
            p.grad = grad.to(torch.bfloat16)
            opts[k].step()
    v_ref = ref.state[ref_p]["exp_avg_sq"].mean().item()
    rows = []
    for k, (key, p) in runs.items():
        v = opts[k].state[p][key]
        v = v.dequantize() if hasattr(v, "dequantize") else v.float()
        rows.append({"variant": k, "v_mean": v.float().mean().item(), "v_ref_mean": v_ref,
                     "v_ratio_to_fp32": v.float().mean().item() / v_ref,
                     "weight_rel_error": ((p.detach().float() - ref_p.detach()).norm() / ref_p.detach().norm()).item()})
    return rows


def offload_probe() -> dict:
    """torchao's CPUOffloadOptimizer on this machine: it needs a CUDA or XPU device for its streams."""
    from torchao.optim import CPUOffloadOptimizer

    p = torch.nn.Parameter(torch.zeros(8192))
    try:
        opt = CPUOffloadOptimizer([p], torch.optim.AdamW, lr=1e-3)
        return {"runs": True, "inner": type(next(iter(opt.optim_dict.values()))).__name__}
    except (AssertionError, RuntimeError) as e:
        return {"runs": False, "error": f"{e.__class__.__name__}: {str(e).splitlines()[0][:160]}"}


def dtensor_probe(names) -> list[dict]:
    """Does each optimizer step a DTensor parameter (what FSDP2 hands it)? One-process gloo mesh."""
    import os

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29_500 + os.getpid() % 1000))
        dist.init_process_group("gloo", rank=0, world_size=1)
    mesh = init_device_mesh("cpu", (1,))
    rows = []
    for name in names:
        dtype, _, build = VARIANTS[name]
        full = (torch.randn(256, 64, generator=torch.Generator().manual_seed(0)) * 0.03).to(getattr(torch, dtype))
        p = torch.nn.Parameter(distribute_tensor(full, mesh, [Shard(0)]))
        try:
            opt = build([p], 1e-3)
            p.grad = distribute_tensor(torch.ones_like(full), mesh, [Shard(0)])
            opt.step()
            moved = (p.full_tensor().float() - full.float()).abs().mean().item()
            rows.append({"variant": name, "steps_dtensor": math.isfinite(moved) and moved > 0})
        except Exception as e:  # noqa: BLE001 - the failure is the finding
            rows.append({"variant": name, "steps_dtensor": False,
                         "error": f"{e.__class__.__name__}: {str(e).splitlines()[0][:160]}"})
    dist.destroy_process_group()
    return rows


def main(argv=None) -> dict:
    import argparse
    import json
    import os
    import sys

    from cascade.perf.bench import device_name, git_revision, versions

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--matrices", type=int, default=3, help="1024x1024 matrices in the parameter set")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--ulp-steps", type=int, default=200, help="steps of the lr-1e-7 bf16 regime (0: skip)")
    ap.add_argument("--variants", default="all", help="comma-separated names from VARIANTS, or all")
    ap.add_argument("--out", required=True, help="folder for results.json")
    a = ap.parse_args(argv)
    names = list(VARIANTS) if a.variants == "all" else [n.strip() for n in a.variants.split(",")]
    start = param_set(a.matrices)
    report = {"device": device_name(), "command": " ".join(["python", "scripts/optimizer_compare.py"] + sys.argv[1:]),
              "git": git_revision(), "versions": {**versions(), "torchao": _version("torchao")},
              "config": {"matrices": a.matrices, "params": sum(w.numel() for w in start), "steps": a.steps,
                         "lr": a.lr, "ulp_steps": a.ulp_steps, "weight_scale": 0.03, "grad_scale": "1e-3, 1e-4 after N/2"}}
    report["comparison"] = compare(names, start, a.steps, a.lr)
    if a.ulp_steps:
        bf16 = [n for n in names if VARIANTS[n][0] == "bfloat16"]
        report["ulp_regime"] = {"lr": 1e-7, "steps": a.ulp_steps,
                                "rows": compare(bf16, param_set(1), a.ulp_steps, 1e-7, resume=False)}
    report["second_moment_after_drop"] = second_moment_after_drop()
    report["cpu_offload"] = offload_probe()
    report["dtensor"] = dtensor_probe([n for n in names if VARIANTS[n][1] != "reference"])
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(report, indent=1, default=str))
    os.replace(tmp, out / "results.json")
    return report


def _version(pkg: str):
    import importlib.metadata as md

    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return None
