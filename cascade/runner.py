"""The cascade runner: T5 once, then stage I -> stage II -> optional stage III (IF: 64 -> 256 -> 1024;
each stage samples at its UNet's sample_size, stage II upsampling what stage I made).

One stage is resident at a time (loaded, run over every image, released), so peak memory is the
largest stage rather than the sum. Image k of a request always uses seed + k for stage I and
seed + k + STAGE2_SEED_OFFSET for stage II, so a batch split or a process split never changes it.
"""
from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cascade import model_checks, models, resolutions
from cascade.config import Config
from cascade.text import TextEncoder, shorten
from stages import components, data, sampling, setup, stage3
from stages.errors import InputError, writing

log = logging.getLogger(__name__)

STAGE2_SEED_OFFSET = 1_000_000
DEFAULT_SR_NOISE_LEVEL = 250  # IFSuperResolutionPipeline's default
DEFAULT_UPSCALER_NOISE_LEVEL = 100  # what DeepFloyd's IF examples use with the x4 upscaler


def device() -> torch.device:
    """This process's device: accelerate's process state has made its GPU the current one."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


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


class _ImageBar:
    """One bar per stage over all images of a request (not one per batch), the sampler step shown
    beside it; silent when disabled."""

    def __init__(self, total: int, desc: str, enabled: bool):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc=desc, unit="image", disable=not enabled)

    def step(self, i: int, n: int):
        if not self.bar.disable:
            self.bar.set_postfix_str(f"step {i}/{n}", refresh=True)

    def update(self, n: int):
        self.bar.update(n)


@contextlib.contextmanager
def image_bar(total: int, desc: str, enabled: bool):
    bar = _ImageBar(total, desc, enabled)
    try:
        yield bar
    finally:
        bar.bar.close()


def grid_columns(num_prompts: int, num_images: int) -> int:
    """Columns of a near-square grid: whole prompts per row where a prompt's images fit in the side
    (several prompts per row when each has few images); otherwise one prompt per row (up to 8
    columns, then a prompt takes several rows); a single prompt makes a square."""
    side = math.ceil(math.sqrt(num_prompts * num_images))
    if num_images <= side:
        return num_images * math.ceil(side / num_images)
    return side if num_prompts == 1 else min(num_images, max(side, 8))


def grid_slots(num_prompts: int, num_images: int) -> tuple[int, list[int]]:
    """(columns, grid cell of each image): every prompt starts a new row unless whole prompts share one."""
    cols = grid_columns(num_prompts, num_images)
    if cols % num_images == 0 or num_prompts == 1:
        return cols, list(range(num_prompts * num_images))
    rows = math.ceil(num_images / cols)  # rows of one prompt
    return cols, [p * rows * cols + k for p in range(num_prompts) for k in range(num_images)]


def grid_caption(num_prompts: int, num_images: int) -> str:
    cols = grid_columns(num_prompts, num_images)
    if num_prompts == 1:
        return f"one prompt, {num_images} images in rows of {cols}"
    if cols % num_images == 0:
        per_row = cols // num_images
        return "one row per prompt" if per_row == 1 else f"{per_row} prompts per row, in order"
    return f"each prompt on its own {math.ceil(num_images / cols)} rows of {cols}"


def _batches(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def run_stage1(path: str, cfg: Config, embeds: torch.Tensor, negative: torch.Tensor, seeds: list[int],
               progress: bool = False) -> torch.Tensor:
    s = cfg.stage1.sample
    out = []
    with resident(path, cfg) as (unet, sched), image_bar(len(seeds), "stage I (64px)", progress) as bar:
        for sl in _batches(len(seeds), s.batch_size):
            gens = [torch.Generator().manual_seed(x) for x in seeds[sl]]
            out.append(sampling.sample(unet, sched, embeds[sl], negative, s.steps, s.guidance_scale, gens,
                                       resolution=unet.config.sample_size, on_step=bar.step).cpu())
            bar.update(len(gens))
    return torch.cat(out)


def run_stage2(path: str, cfg: Config, lowres: torch.Tensor, embeds: torch.Tensor, negative: torch.Tensor,
               seeds: list[int], progress: bool = False, noise_level: int | None = None) -> torch.Tensor:
    """`noise_level` None: the configured / trained level (sr_noise_level)."""
    s = cfg.stage2.sample
    level = sr_noise_level(path, s.noise_level) if noise_level is None else noise_level
    out = []
    with resident(path, cfg, ("scheduler", "image_noising_scheduler")) as (unet, sched, noising), \
            image_bar(len(seeds), "stage II (256px)", progress) as bar:
        for sl in _batches(len(seeds), s.batch_size):
            gens = [torch.Generator().manual_seed(x + STAGE2_SEED_OFFSET) for x in seeds[sl]]
            out.append(sampling.sample(unet, sched, embeds[sl], negative, s.steps, s.guidance_scale, gens,
                                       resolution=unet.config.sample_size, lowres=lowres[sl], noise_level=level,
                                       noising_scheduler=noising, on_step=bar.step).cpu())
            bar.update(len(gens))
    return torch.cat(out)


def class_pair_sampler(cfg: Config, paths: models.ModelPaths, class_embeds, negative):
    """make(seeds) -> 256px class images from the frozen stage I -> stage II cascade (stage II
    prior preservation); the base models, never fine-tuned exports, so the prior stays the prior, and
    the base SR model samples at its own level (IF's 250), not the level the fine-tune is set to."""
    base1 = components.describe_source(paths.stage1).base
    base2 = components.describe_source(paths.stage2).base

    def make(seeds: list[int]) -> torch.Tensor:
        e = class_embeds.expand(len(seeds), -1, -1)
        low = run_stage1(base1, cfg, e, negative, seeds)
        return run_stage2(base2, cfg, low, e, negative, seeds, noise_level=DEFAULT_SR_NOISE_LEVEL)
    return make


def run_stage3(path: str, cfg: Config, images: torch.Tensor, prompts: list[str], seeds: list[int],
               negative: str = "", progress: bool = False) -> list:
    """x4 upscaling (IF: 256 -> 1024) of the stage II output; image k uses its own seeded generator."""
    s = cfg.stage3
    gens = [torch.Generator().manual_seed(x + 2 * STAGE2_SEED_OFFSET) for x in seeds]
    out = stage3.upscale(path, data.to_pil(images), prompts, gens, s.steps, s.guidance_scale,
                         s.noise_level if s.noise_level >= 0 else DEFAULT_UPSCALER_NOISE_LEVEL,
                         models.weights_dtype(cfg), s.batch_size, negative, progress, device=device())
    release()
    return out


PLACEHOLDER = re.compile(r"\[v\]", re.IGNORECASE)  # "[V]" or "[v]"


def fill_identifier(prompt: str, stage1_path: str) -> str:
    """Replace the "[V]" placeholder with the identifier a fine-tuned stage I export was trained on."""
    if not PLACEHOLDER.search(prompt):
        return prompt
    meta = components.describe_source(stage1_path).meta or {}
    if "identifier" not in meta:
        raise InputError(f"prompt {shorten(prompt)!r} uses [V] but stage I ({stage1_path}) is not a fine-tuned "
                         f"export with an identifier; write the identifier into the prompt")
    return PLACEHOLDER.sub(lambda _: meta["identifier"], prompt)


def check_request(paths: models.ModelPaths, prompts: list[str]):
    """Cheap checks of a sampling request, before any output folder or model: the stages fit
    together and every prompt says something."""
    for i, p in enumerate(prompts):
        if not p.strip():
            raise InputError(f"prompt {i + 1} is empty; give the text to sample")
    resolutions.check_cascade(paths.stage1, paths.stage2)  # each model of its stage; the sizes chain
    if paths.stage2 == "none":
        return
    id1 = (components.describe_source(paths.stage1).meta or {}).get("identifier")
    id2 = (components.describe_source(paths.stage2).meta or {}).get("identifier")
    if id1 and id2 and id1 != id2:
        raise InputError(f"stage I export {paths.stage1} was trained with identifier {id1!r} but stage II export "
                         f"{paths.stage2} with {id2!r}: one prompt cannot name both; retrain one stage with "
                         f"--identifier {id1}, or sample with the base stage II model")
    model_checks.check_same_subject(paths.stage1, paths.stage2)


def model_record(path: str) -> dict:
    """Which weights made an image: the source, and a digest of the trained weights when an export."""
    src = components.describe_source(path)
    rec = {"path": path, "kind": src.kind, "base": src.base}
    if src.export is not None:
        files = sorted(src.export.rglob("*.safetensors"))
        rec["sha256_16"] = {str(f.relative_to(src.export)): components.file_digest(f) for f in files}
    return rec


@dataclass
class SampleResult:
    folder: Path
    prompts: list[str]
    seeds: list[int]
    files: dict = field(default_factory=dict)  # stage name -> list of image paths (this process)
    seconds: dict = field(default_factory=dict)


def run_cascade(cfg: Config, paths: models.ModelPaths, prompts: list[str], num_images: int, seed: int,
                output: Path, negative_prompt: str = "", encoder: TextEncoder | None = None,
                progress: bool = True) -> SampleResult:
    """Sample `num_images` per prompt through stage I -> II (-> III); write each stage's images, a
    grid per stage, and samples.json. With several processes (accelerate / torchrun) the images are
    split between them; every image is the same as in a single-process run."""
    state = setup.process_state(cfg.distributed_timeout_minutes)
    check_request(paths, prompts)
    if paths.stage2 == "none" and paths.stage3 != "none":
        log.warning("stage III (%s) skipped: it upscales stage II's output and stage II is none", paths.stage3)
    prompts = [fill_identifier(p, paths.stage1) for p in prompts]
    items = [(i * num_images + k, p) for i, p in enumerate(prompts) for k in range(num_images)]
    encoder = encoder or TextEncoder(paths.text_encoder, cfg.models.cache_dir, cfg.max_text_length,
                                     models.weights_dtype(cfg), cfg.models.variant,
                                     device=models.text_encoder_device(cfg))
    if state.is_main_process:
        encoder.check_lengths(prompts)
        embeds = encoder.encode(list(dict.fromkeys(prompts)) + [negative_prompt])  # T5 once, then released
    state.wait_for_everyone()
    if not state.is_main_process:
        embeds = encoder.encode(list(dict.fromkeys(prompts)) + [negative_prompt])  # from the cache
    with state.split_between_processes(items) as mine:
        mine = list(mine)
    log.info("process %d/%d samples %d of %d images", state.process_index, state.num_processes, len(mine), len(items))
    result = SampleResult(output, prompts, [seed + i for i, _ in items])
    if mine:
        idx = [i for i, _ in mine]
        seeds = [seed + i for i in idx]
        e = torch.cat([embeds[p] for _, p in mine])
        neg = embeds[negative_prompt]
        t = time.time()
        images = run_stage1(paths.stage1, cfg, e, neg, seeds, progress)
        result.seconds["stage1"] = time.time() - t
        result.files["stage1"] = _save(images, output / "stage1", idx)
        if paths.stage2 != "none":
            t = time.time()
            images = run_stage2(paths.stage2, cfg, images, e, neg, seeds, progress)
            result.seconds["stage2"] = time.time() - t
            result.files["stage2"] = _save(images, output / "stage2", idx)
            if paths.stage3 != "none":
                t = time.time()
                up = run_stage3(paths.stage3, cfg, images, [p for _, p in mine], seeds, negative_prompt, progress)
                result.seconds["stage3"] = time.time() - t
                result.files["stage3"] = _save_pil(up, output / "stage3", idx)
    state.wait_for_everyone()
    if state.is_main_process:
        _write_grids(output, *grid_slots(len(prompts), num_images))
        _write_record(cfg, paths, output, prompts, num_images, seed, negative_prompt, result)
    return result


def _save(images: torch.Tensor, folder: Path, idx: list[int]) -> list[Path]:
    return _save_pil(data.to_pil(images), folder, idx)


def _save_pil(images: list, folder: Path, idx: list[int]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, im in zip(idx, images):
        with writing(folder / f"{i:05d}.png"):
            im.save(folder / f"{i:05d}.png")
        out.append(folder / f"{i:05d}.png")
    return out


def _write_grids(output: Path, cols: int, slots: list[int]):
    from PIL import Image

    for stage in ("stage1", "stage2", "stage3"):
        files = sorted((output / stage).glob("[0-9]*.png")) if (output / stage).is_dir() else []
        if files:
            ims = [Image.open(f).convert("RGB") for f in files]
            size = min(ims[0].size[0], 256)  # keep 1024px grids small
            cells = [None] * (max(slots[:len(ims)]) + 1)
            for slot, im in zip(slots, ims):
                cells[slot] = im.resize((size, size))
            data.grid(cells, cols=cols).save(output / f"grid-{stage}.png")


def _write_record(cfg, paths, output, prompts, num_images, seed, negative, result: SampleResult):
    rec = {
        "prompts": prompts, "negative_prompt": negative, "num_images_per_prompt": num_images, "seed": seed,
        "images": [{"index": i, "prompt": prompts[i // num_images], "seed_stage1": seed + i,
                    "seed_stage2": seed + i + STAGE2_SEED_OFFSET} for i in range(len(prompts) * num_images)],
        "stage1": {**model_record(paths.stage1), "steps": cfg.stage1.sample.steps,
                   "guidance_scale": cfg.stage1.sample.guidance_scale},
        "stage2": None if paths.stage2 == "none" else {
            **model_record(paths.stage2), "steps": cfg.stage2.sample.steps,
            "guidance_scale": cfg.stage2.sample.guidance_scale,
            "noise_level": sr_noise_level(paths.stage2, cfg.stage2.sample.noise_level)},
        "stage3": None if paths.stage3 == "none" or paths.stage2 == "none" else {
            "path": paths.stage3, "steps": cfg.stage3.steps, "guidance_scale": cfg.stage3.guidance_scale,
            "noise_level": cfg.stage3.noise_level},
        "seconds_main_process": result.seconds,
        "random_weights": paths.uses_tiny,
    }
    (output / "samples.json").write_text(json.dumps(rec, indent=2))
