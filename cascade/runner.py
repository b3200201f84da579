"""The cascade runner: T5 once, then stage I (64) -> stage II (256) -> optional stage III (1024).

One stage is resident at a time (loaded, run over every image, released), so peak memory is the
largest stage rather than the sum. Image k of a request always uses seed + k for stage I and
seed + k + STAGE2_SEED_OFFSET for stage II, so a batch split or a process split never changes it.
"""
from __future__ import annotations

import contextlib
import gc
import logging
from dataclasses import dataclass

import torch

from cascade import models
from cascade.config import Config
from stages import components, sampling

log = logging.getLogger(__name__)

STAGE2_SEED_OFFSET = 1_000_000
DEFAULT_SR_NOISE_LEVEL = 250  # IFSuperResolutionPipeline's default


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def release():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextlib.contextmanager
def resident(path: str, cfg: Config, subfolders=("scheduler",)):
    """Load one stage's UNet (+ schedulers) onto the device for the duration of the block."""
    unet = components.load_unet(path, models.weights_dtype(cfg), cfg.models.variant).to(device()).eval()
    scheds = [components.load_scheduler(path, s) for s in subfolders]
    try:
        yield unet, *scheds
    finally:
        del unet
        release()


def sr_noise_level(path: str, setting: int) -> int:
    """The stage II sampling level: the setting if given, else what a fine-tuned export was trained
    for, else IF's default of 250."""
    if setting >= 0:
        return setting
    meta = components.describe_source(path).meta or {}
    return int(meta.get("sample_noise_level", DEFAULT_SR_NOISE_LEVEL))


def _batches(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def run_stage1(path: str, cfg: Config, embeds: torch.Tensor, negative: torch.Tensor, seeds: list[int],
               progress: bool = False) -> torch.Tensor:
    s = cfg.stage1.sample
    out = []
    with resident(path, cfg) as (unet, sched):
        for sl in _batches(len(seeds), s.batch_size):
            gens = [torch.Generator().manual_seed(x) for x in seeds[sl]]
            out.append(sampling.sample(unet, sched, embeds[sl], negative, s.steps, s.guidance_scale, gens,
                                       resolution=unet.config.sample_size, progress=progress).cpu())
    return torch.cat(out)


def run_stage2(path: str, cfg: Config, lowres: torch.Tensor, embeds: torch.Tensor, negative: torch.Tensor,
               seeds: list[int], progress: bool = False) -> torch.Tensor:
    s = cfg.stage2.sample
    level = sr_noise_level(path, s.noise_level)
    out = []
    with resident(path, cfg, ("scheduler", "image_noising_scheduler")) as (unet, sched, noising):
        for sl in _batches(len(seeds), s.batch_size):
            gens = [torch.Generator().manual_seed(x + STAGE2_SEED_OFFSET) for x in seeds[sl]]
            out.append(sampling.sample(unet, sched, embeds[sl], negative, s.steps, s.guidance_scale, gens,
                                       resolution=unet.config.sample_size, lowres=lowres[sl], noise_level=level,
                                       noising_scheduler=noising, progress=progress).cpu())
    return torch.cat(out)


def class_pair_sampler(cfg: Config, paths: models.ModelPaths, class_embeds, negative):
    """make(seeds) -> 256px class images from the frozen stage I -> stage II cascade (stage II
    prior preservation); the base models, never fine-tuned exports, so the prior stays the prior."""
    base1 = components.describe_source(paths.stage1).base
    base2 = components.describe_source(paths.stage2).base

    def make(seeds: list[int]) -> torch.Tensor:
        e = class_embeds.expand(len(seeds), -1, -1)
        low = run_stage1(base1, cfg, e, negative, seeds)
        return run_stage2(base2, cfg, low, e, negative, seeds)
    return make


@dataclass
class CascadeOutput:
    stage1: torch.Tensor
    stage2: torch.Tensor | None
    stage3: list | None
    noise_level: int | None
