"""`cascade bench`: time training steps and sampling of one stage on the device present.

Weights are random (real presets: the shipped real architecture; tiny: the tiny one), the batch is
synthetic and the step is the trainer's (forward under autocast, backward, optimizer step with the
config's memory options). Reports the median step time after warm-up, steps/s, images/s, peak
memory (CUDA allocator stats, or peak RSS on CPU), FLOPs per step (FlopCounterMode) and, on a GPU
whose peak is known, MFU. `--compare` also runs the naive path (fp32 weights, no checkpointing,
full-precision AdamW, T5 resident).

On CPU each variant runs in a fresh process (peak RSS only grows, and freed memory that the C
allocator keeps would leak into the next variant's figure). The memory measured is that process's
peak RSS minus its RSS just before the model is built (the interpreter and libraries), with glibc
told to return every allocation above 64 KiB to the system when freed (MALLOC_MMAP_THRESHOLD_), so
RSS follows the live tensors as CUDA's max_memory_allocated does on a GPU. `--estimate` puts the
planner's figure for the same step beside each measurement."""
from __future__ import annotations

import json
import multiprocessing
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from cascade.perf import arch
from cascade.perf.step import synthetic_batch, train_step
from stages import activation_ckpt, setup
from stages.optimizers import factory, low_precision

# dense bf16 peak FLOP/s of common accelerators (vendor data sheets), for MFU
PEAK_FLOPS = {"A100": 312e12, "H100": 989e12, "H200": 989e12, "L40S": 362e12, "L4": 121e12, "A10G": 125e12,
              "RTX 4090": 165e12, "RTX 3090": 71e12, "V100": 125e12}


@dataclass
class Variant:
    name: str
    weights_dtype: str = "float32"
    checkpointing: str = "none"
    use_8bit_adam: bool = False
    optimizer_states: str = "fp32"
    in_backward: bool = False
    fused: bool = True
    lora_rank: int = 0
    t5_resident: bool = False
    compile: bool = False


def from_train_cfg(tc, name: str = "config") -> Variant:
    ckpt = tc.gradient_checkpointing_scope if tc.gradient_checkpointing else "none"
    return Variant(name, tc.weights_dtype, ckpt, tc.use_8bit_adam, tc.optimizer_states, tc.optimizer_in_backward,
                   tc.fused_optimizer, tc.lora_rank, False, tc.compile)


def naive() -> Variant:
    return Variant("naive", fused=False, t5_resident=True)


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def peak_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "diffusers", "transformers", "accelerate", "peft", "bitsandbytes"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def git_revision() -> str | None:
    try:
        root = Path(__file__).resolve().parents[2]
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (rev + ("-dirty" if dirty else "")) or None
    except (OSError, subprocess.SubprocessError):
        return None


def rss_bytes() -> int:
    """Current resident set size (Linux /proc), for the baseline before a run."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:
        return 0


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def build_unet(model: str, stage: int, dtype: torch.dtype, device):
    """Random weights: the real architecture for hub ids of the presets, else the tiny one."""
    torch.manual_seed(0)
    name = arch.arch_for(model)
    if name is not None:
        return arch.build_unet(name, device="cpu", dtype=dtype).to(device=device)
    from cascade.offline import tiny

    with arch.default_dtype(dtype):
        unet = tiny.build_stage1_unet() if stage == 1 else tiny.build_stage2_unet()
    return unet.to(device=device)


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _import_libraries():
    """Everything a step imports lazily, loaded before the RSS baseline so it is not counted as memory."""
    import importlib.util

    import diffusers  # noqa: F401
    from diffusers import UNet2DConditionModel  # noqa: F401
    from torch.utils.flop_counter import FlopCounterMode  # noqa: F401

    import peft.tuners.lora  # noqa: F401

    if importlib.util.find_spec("bitsandbytes"):
        import bitsandbytes.functional  # noqa: F401
        import bitsandbytes.optim  # noqa: F401


def run_variant(v: Variant, model: str, stage: int, tc, batch: int, steps: int, warmup: int, sample_steps: int,
                sample_batch: int, text_len: int = 77, resolution: int | None = None) -> dict:
    """Time `steps` training steps (after `warmup`) and one sampling call; report memory and FLOPs."""
    from torch.utils.flop_counter import FlopCounterMode

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    _import_libraries()
    rss0 = rss_bytes()
    t5 = None
    if v.t5_resident:  # the naive path keeps the text encoder loaded while training
        t5 = arch.build_t5(device="cpu", dtype=torch.float16).to(device) if arch.arch_for(model) else \
            _tiny_t5(device)
    unet = build_unet(model, stage, getattr(torch, v.weights_dtype), device)
    if v.lora_rank:
        setup.add_lora(unet, v.lora_rank, 0)
    activation_ckpt.apply(unet, v.checkpointing)
    if v.compile:
        unet.compile()
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    cfg = replace(tc, weights_dtype=v.weights_dtype, use_8bit_adam=v.use_8bit_adam, optimizer_states=v.optimizer_states,
                  optimizer_in_backward=v.in_backward, fused_optimizer=v.fused, max_grad_norm=0.0,
                  gradient_accumulation_steps=1)
    opt, opt_name = factory.build(params, cfg)
    autocast = device.type == "cuda"
    n = batch * (2 if stage == 1 and tc.prior_preservation else 1)
    gen = torch.Generator().manual_seed(0)

    def step():
        x, t, enc, labels = (v if v is None else v.to(device)
                             for v in synthetic_batch(unet.config, n, text_len, generator=gen, resolution=resolution))
        x, enc = low_precision.cast_for_model(unet, x, enc)
        train_step(unet, opt, (x, t, enc, labels), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast))

    times = []
    for i in range(warmup + steps):
        _sync()
        t0 = time.perf_counter()
        step()
        _sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    # the training steps' peak, before the FLOP-counting step (its dispatch mode holds more) and sampling
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else peak_rss_bytes() - rss0
    flops = FlopCounterMode(display=False)
    with flops:
        step()
    step_flops = flops.get_total_flops()
    median = statistics.median(times)
    result = {"variant": v.__dict__, "optimizer": opt_name, "params": sum(p.numel() for p in unet.parameters()),
              "trainable": sum(p.numel() for p in params), "images_per_step": n,
              "train": {"step_s_median": median, "step_s_all": times, "steps_per_s": 1 / median,
                        "images_per_s": n / median, "flops_per_step": step_flops,
                        "achieved_flops_per_s": step_flops / median}}
    pf = peak_flops()
    result["train"]["mfu"] = step_flops / median / pf if pf else None
    result["sample"] = _time_sampling(unet, stage, sample_batch, sample_steps, text_len, device) if sample_steps else None
    result["peak_memory_bytes"] = peak
    if device.type == "cuda":
        result["peak_memory_kind"] = "cuda max_memory_allocated of the training steps"
    else:
        result["peak_memory_kind"] = ("peak RSS of the training steps in their own process, minus the RSS "
                                      "before the model was built")
        result["rss_before_bytes"] = rss0
        result["malloc_mmap_threshold"] = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    result["t5_bytes"] = sum(p.numel() * p.element_size() for p in t5.parameters()) if t5 is not None else 0
    del unet, opt, t5
    return result


MMAP_THRESHOLD = str(64 * 1024)


def run_isolated(*args, **kwargs) -> dict:
    """`run_variant` in a fresh spawned process (CPU), with glibc returning freed tensors to the system."""
    saved = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = MMAP_THRESHOLD  # read by the child's C library at start
    try:
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            return pool.apply(_run_with_threads, (torch.get_num_threads(), args, kwargs))
    finally:
        if saved is None:
            os.environ.pop("MALLOC_MMAP_THRESHOLD_")
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = saved


def _run_with_threads(threads: int, args, kwargs) -> dict:
    torch.set_num_threads(threads)
    return run_variant(*args, **kwargs)


def planner_estimate(v: Variant, model: str, stage: int, tc, batch: int, resolution: int | None) -> dict:
    """The planner's trace of the step `run_variant` takes (CPU: no autocast)."""
    from cascade.perf import planner

    plan = planner.Plan(arch.arch_for(model) or f"tiny-stage{stage}", batch, stage == 1 and tc.prior_preservation,
                       v.weights_dtype, v.checkpointing, v.use_8bit_adam, v.optimizer_states, v.in_backward,
                       v.lora_rank, autocast=None, resolution=resolution)
    return planner.trace_step(plan)["bytes"]


def _tiny_t5(device):
    from cascade.offline import tiny

    return tiny.build_text_encoder(16000).to(device)


def _time_sampling(unet, stage: int, batch: int, steps: int, text_len: int, device) -> dict:
    from cascade.offline import tiny
    from stages import sampling

    unet.eval()
    dtype = unet.dtype
    cfg = unet.config
    emb_dim = cfg.encoder_hid_dim or cfg.cross_attention_dim
    gen = torch.Generator().manual_seed(0)
    embeds = torch.randn(batch, text_len, emb_dim, generator=gen)
    neg = torch.randn(1, text_len, emb_dim, generator=gen)
    kw = {}
    if stage == 2:
        kw = dict(lowres=torch.rand(batch, 3, 64, 64, generator=gen) * 2 - 1, noise_level=20,
                  noising_scheduler=tiny.if_noising_scheduler())
    _sync()
    t0 = time.perf_counter()
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        sampling.sample(unet, tiny.if_scheduler(1.5 if stage == 1 else 1.0), embeds.to(dtype), neg.to(dtype), steps,
                        guidance_scale=7.0, generator=gen, resolution=cfg.sample_size, **kw)
    _sync()
    seconds = time.perf_counter() - t0
    unet.train()
    return {"batch": batch, "steps": steps, "seconds": seconds, "images_per_s": batch / seconds}


def markdown_line(report: dict) -> str:
    rows = []
    for r in report["results"]:
        tr = r["train"]
        mfu = f", MFU {tr['mfu'] * 100:.1f}%" if tr.get("mfu") else ""
        sample = f"sampling {r['sample']['images_per_s']:.3f} img/s, " if r["sample"] else ""
        plan = (f", planner {r['planner']['peak_with_t5'] / 2**30:.2f} GiB "
                f"({(r['planner']['over_measured'] - 1) * 100:+.1f}%)") if r.get("planner") else ""
        rows.append(f"{r['variant']['name']}: {tr['steps_per_s']:.3f} steps/s ({tr['images_per_s']:.2f} img/s), "
                    f"{sample}peak {r['peak_memory_bytes'] / 2**30:.2f} GiB{plan} "
                    f"({r['peak_memory_kind']}), {tr['flops_per_step'] / 1e12:.3f} TFLOP/step{mfu}")
    return f"| {report['model']} (stage {report['stage']}) on {report['device']} | " + " / ".join(rows) + " |"


def bench(cfg, stage: int, steps: int, warmup: int, sample_steps: int, compare: bool, batch: int | None = None,
          t5_resident: bool | None = None, resolution: int | None = None, estimate: bool = False) -> dict:
    sec = cfg.stage1 if stage == 1 else cfg.stage2
    tc = sec.train
    model = cfg.models.stage1 if stage == 1 else cfg.models.stage2
    batch = batch or tc.batch_size
    variants = [from_train_cfg(tc)]
    if compare:
        nv = naive()
        if t5_resident is not None:
            nv.t5_resident = t5_resident
        variants.append(nv)
    run = run_variant if torch.cuda.is_available() else run_isolated
    results = [run(v, model, stage, tc, batch, steps, warmup, sample_steps, sec.sample.batch_size,
                   resolution=resolution) for v in variants]
    if estimate:
        for v, r in zip(variants, results):
            est = planner_estimate(v, model, stage, tc, batch, resolution)
            r["planner"] = {"bytes": est, "peak_with_t5": est["peak"] + r["t5_bytes"],
                            "over_measured": (est["peak"] + r["t5_bytes"]) / r["peak_memory_bytes"]}
    report = {"device": device_name(), "command": " ".join(["cascade"] + sys.argv[1:]), "model": model,
              "stage": stage, "resolution": resolution, "batch": batch, "config": {"name": cfg.name, "train": tc.__dict__, "sample": sec.sample.__dict__},
              "versions": versions(), "git": git_revision(), "steps": steps, "warmup": warmup, "results": results}
    if compare:
        a, b = results
        report["ratios_naive_over_config"] = {
            "peak_memory": b["peak_memory_bytes"] / a["peak_memory_bytes"],
            "step_time": b["train"]["step_s_median"] / a["train"]["step_s_median"]}
    report["markdown"] = markdown_line(report)
    return report


def write_report(report: dict, path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str))
    tmp.replace(path)
