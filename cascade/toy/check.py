"""`cascade toy check`: the bars of the pretrained toy cascade, measured with the readers.

Stage I: colour and shape accuracy of samples of "a <colour> <shape> toy" (all 24 pairs in turn).
Stage II: from real 16 px views of fresh generator images and their full captions, the pattern
accuracy of the 64 px outputs and their consistency: PSNR of the output downsampled back to 16 px
against the input (colours and background kept, not only the pattern). The bilinear upsampling of
the input is read too, as the no-SR baseline for the pattern.
"""
from __future__ import annotations

import itertools
import math
from pathlib import Path

import torch

from cascade.toy import readers, world


def _generators(n: int, seed: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed * 100_003 + i) for i in range(n)]


def _embeds(stage1: Path, prompts: list[str], cache_dir: str):
    from cascade.text import TextEncoder

    return TextEncoder(str(stage1), cache_dir, device="cpu").encode(list(prompts) + [""])


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (dB) of [-1, 1] batches on the 0..1 scale."""
    mse = ((a - b) / 2).pow(2).flatten(1).mean(1).clamp(min=1e-10)
    return 10 * torch.log10(1 / mse)


@torch.no_grad()
def check_stage1(root: Path, n: int = 128, steps: int = 50, guidance: float = 4.0, seed: int = 0,
                 batch: int = 32, cache_dir: str = "~/.cache/cascade") -> dict:
    from diffusers import IFPipeline

    from stages.sampling import sample

    pipe = IFPipeline.from_pretrained(root / "stage1", safety_checker=None, watermarker=None, feature_extractor=None,
                                      requires_safety_checker=False)
    pairs = list(itertools.islice(itertools.cycle(itertools.product(world.COLOURS, world.SHAPES)), n))
    prompts = [world.caption(c, s, None) for c, s in pairs]
    emb = _embeds(root / "stage1", prompts, cache_dir)
    gens, images = _generators(n, seed), []
    for i in range(0, n, batch):
        e = torch.cat([emb[p] for p in prompts[i:i + batch]])
        images.append(sample(pipe.unet, pipe.scheduler, e, emb[""], steps, guidance, gens[i:i + batch], world.LO))
    images = torch.cat(images)
    reads = [readers.locate(im) for im in images]
    colour = sum(r[0] == c for r, (c, _) in zip(reads, pairs)) / n
    shape = sum(r[1] == s for r, (_, s) in zip(reads, pairs)) / n
    return {"n": n, "steps": steps, "guidance": guidance, "colour_acc": colour, "shape_acc": shape,
            "images": images}


@torch.no_grad()
def check_stage2(root: Path, n: int = 128, steps: int = 50, guidance: float = 4.0, noise_level: int = 100,
                 seed: int = 0, batch: int = 16, cache_dir: str = "~/.cache/cascade") -> dict:
    from diffusers import IFSuperResolutionPipeline

    from stages.noise_aug import upsample
    from stages.sampling import sample

    pipe = IFSuperResolutionPipeline.from_pretrained(root / "stage2", safety_checker=None, watermarker=None,
                                                     feature_extractor=None, requires_safety_checker=False)
    toys, hi = world.dataset(n, 1_000_000 + seed)  # not the pretraining pool (seed + 1)
    lo = world.to_lowres(hi)
    prompts = [world.caption(*t.attributes) for t in toys]
    emb = _embeds(root / "stage1", prompts, cache_dir)
    gens, outs = _generators(n, seed), []
    for i in range(0, n, batch):
        e = torch.cat([emb[p] for p in prompts[i:i + batch]])
        outs.append(sample(pipe.unet, pipe.scheduler, e, emb[""], steps, guidance, gens[i:i + batch], world.HI,
                           lowres=lo[i:i + batch], noise_level=noise_level,
                           noising_scheduler=pipe.image_noising_scheduler))
    out = torch.cat(outs)
    pattern = sum(readers.read_pattern(o) == t.pattern for o, t in zip(out, toys)) / n
    base = sum(readers.read_pattern(u) == t.pattern for u, t in zip(upsample(lo, world.HI), toys)) / n
    cons = psnr(world.to_lowres(out), lo)
    return {"n": n, "steps": steps, "guidance": guidance, "noise_level": noise_level, "pattern_acc": pattern,
            "pattern_acc_bilinear": base, "consistency_psnr": float(cons.mean()),
            "psnr_vs_truth": float(psnr(out, hi).mean()), "images": out, "inputs": lo}


BARS = {"colour_acc": 0.95, "shape_acc": 0.90, "pattern_acc": 0.80, "consistency_psnr": 30.0}


def below_bars(r1: dict | None, r2: dict | None) -> list[str]:
    """The measures under their bar (the ones `report` prints), e.g. ["colour_acc 0.12 < 0.95"]."""
    got = {**(r1 or {}), **(r2 or {})}
    return [f"{k} {got[k]:.3g} < {bar:g}" for k, bar in BARS.items() if k in got and not got[k] >= bar]


def report(r1: dict | None, r2: dict | None) -> str:
    lines = []
    if r1:
        lines.append(f"stage I  ({r1['n']} samples, {r1['steps']} steps, guidance {r1['guidance']}): "
                     f"colour {r1['colour_acc']:.1%} (bar 95%), shape {r1['shape_acc']:.1%} (bar 90%)")
    if r2:
        lines.append(f"stage II ({r2['n']} real 16 px inputs, {r2['steps']} steps, guidance {r2['guidance']}, "
                     f"noise level {r2['noise_level']}): pattern {r2['pattern_acc']:.1%} (bar 80%; bilinear "
                     f"upsampling {r2['pattern_acc_bilinear']:.1%}), consistency {r2['consistency_psnr']:.1f} dB "
                     f"(bar 30 dB), PSNR vs truth {r2['psnr_vs_truth']:.1f} dB")
    return "\n".join(lines) if lines else "nothing measured"


def finite(x: float) -> bool:
    return not (math.isnan(x) or math.isinf(x))
