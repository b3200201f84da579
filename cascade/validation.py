"""Validation through the cascade while a stage trains (the stage trainer only calls what it is handed).

- stage I: "a [V] <class>" and "a <class>" (n seeds each, the same seeds at every validation) through
  the model being trained, then upsampled by stage II (the base model, or `validation.chain_model`)
  at stage II's resolution; both prompts in one batch per stage.
- stage II: held-out subject photos (`validation.holdout`; else the first training photo), at stage
  I's size, and stage I's samples of "a <class>" (made once, by the base stage I or
  `validation.chain_model`), upsampled by the model being trained.

The frozen partner stage is loaded once and kept between validations (on the CPU while training
runs on a GPU). Live measures are a `Measures` the command layer hands in (toy readers, DINO /
CLIP-I): the core never imports them.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from cascade import models, resolutions, runner
from cascade.config import Config, ConfigError
from stages import components, data, engines, sampling
from stages.errors import InputError
from stages.validation_log import ValidationResult

log = logging.getLogger(__name__)


@dataclass
class Measures:
    """measure(subject_samples, class_samples) -> {name: value}; both [N, 3, H, W] in [-1, 1] at the
    validation's output size. `names` lists what it returns (the best-checkpoint keys are checked
    against it before training starts); `source` says what measures ("toy readers", "DINO ...")."""
    names: tuple[str, ...]
    measure: Callable[[torch.Tensor, torch.Tensor], dict]
    source: str = ""

    def __call__(self, subject: torch.Tensor, klass: torch.Tensor) -> dict:
        return self.measure(subject, klass)


def check_best(key: str, vc, measures: Measures | None, validation_images: int):
    """One line naming the key when the best-checkpoint option cannot work (before any model loads)."""
    if not vc.best_checkpoint:
        return
    if engines.engine() != "ddp":
        raise ConfigError(f"config '{key}.best_checkpoint': needs whole weights on the main process; not available "
                          f"with {engines.engine()} sharding")
    if validation_images < 1:
        raise ConfigError(f"config '{key}.best_checkpoint': needs validation (train.validation_images >= 1)")
    if measures is None:
        raise ConfigError(f"config '{key}.best_checkpoint': needs live measures (the toy models' readers, or DINO/"
                          f"CLIP in the local cache, with {key}.measures true); none are available")
    for k in ("best_fidelity", "best_drift"):
        if getattr(vc, k) not in measures.names:
            raise ConfigError(f"config '{key}.{k}': {getattr(vc, k)!r} is not a measure here ({measures.source} "
                              f"gives {', '.join(measures.names)})")


class _Frozen:
    """A frozen stage loaded on first use and kept for the run: on the device while it samples, on
    the CPU between validations when the device is a GPU (training needs the memory)."""

    def __init__(self, path: str, cfg: Config, subfolders: tuple[str, ...]):
        self.path, self.cfg, self.subfolders = path, cfg, subfolders
        self.unet = self.scheds = None

    def __enter__(self):
        if self.unet is None:
            self.unet = components.load_unet(self.path, models.weights_dtype(self.cfg), self.cfg.models.variant).eval()
            self.unet.requires_grad_(False)
            self.scheds = [components.load_scheduler(self.path, s) for s in self.subfolders]
        self.unet.to(runner.device())
        return (self.unet, *self.scheds)

    def __exit__(self, *exc):
        if self.unet is not None and torch.cuda.is_available():
            self.unet.to("cpu")
            runner.release()


def _gens(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


class Stage1Validation:
    """Stage I's validator: the model being trained -> frozen stage II (or stage I alone, chain off)."""

    def __init__(self, cfg: Config, embeds: dict, prompts: dict, n: int, steps: int, seed: int,
                 stage2: str | None, measures: Measures | None = None):
        self.cfg, self.n, self.steps, self.seed, self.measures = cfg, n, steps, seed, measures
        self.embeds = torch.cat([embeds[prompts["instance"]].expand(n, -1, -1), embeds[prompts["class"]].expand(n, -1, -1)])
        self.negative = embeds[""]
        self.stage2 = _Frozen(stage2, cfg, ("scheduler", "image_noising_scheduler")) if stage2 else None
        self.level = runner.sr_noise_level(stage2, cfg.stage2.sample.noise_level) if stage2 else None

    def __call__(self, model, step: int, is_main: bool) -> ValidationResult | None:
        seeds = [self.seed + k for k in range(2 * self.n)]  # instance images, then class images
        low = sampling.sample(model, self.scheduler, self.embeds, self.negative, self.steps,
                              self.cfg.stage1.sample.guidance_scale, _gens(seeds),
                              resolution=model.config.sample_size).float().cpu()
        if not is_main:  # sharded engines: every rank took part in stage I; the main process goes on
            return None
        images = low
        if self.stage2 is not None:
            with self.stage2 as (unet2, sched2, noising):
                images = sampling.sample(unet2, sched2, self.embeds, self.negative, self.steps,
                                         self.cfg.stage2.sample.guidance_scale,
                                         _gens([s + runner.STAGE2_SEED_OFFSET for s in seeds]),
                                         resolution=unet2.config.sample_size, lowres=low, noise_level=self.level,
                                         noising_scheduler=noising).float().cpu()
        scalars = self.measures(images[:self.n], images[self.n:]) if self.measures else {}
        return ValidationResult(images, self.n, scalars)

    scheduler = None  # set by make(): the training scheduler of the stage


class Stage2Validation:
    """Stage II's validator: held-out photos and frozen stage I's class samples, upsampled by the model
    being trained."""

    def __init__(self, cfg: Config, embeds: dict, prompts: dict, photos: torch.Tensor, n: int, steps: int,
                 seed: int, stage1: str | None, lowres: int, noising, level: int, measures: Measures | None = None):
        """`photos`: [P, 3, S, S] at stage II's size in [-1, 1] (their stage-I-size views are upsampled)."""
        self.cfg, self.n, self.steps, self.seed, self.measures = cfg, n, steps, seed, measures
        self.photos_low = data.downsample(photos, lowres)
        self.noising, self.level, self.stage1 = noising, level, stage1
        self.prompts, self.embeds_by_prompt, self.negative = prompts, embeds, embeds[""]
        self.class_low = None  # stage I's class samples, made at the first validation

    def _class_low(self) -> torch.Tensor:
        if self.class_low is None:
            seeds = [self.seed + k for k in range(self.n)]
            e = self.embeds_by_prompt[self.prompts["class"]].expand(self.n, -1, -1)
            self.class_low = runner.run_stage1(self.stage1, self.cfg, e, self.negative, seeds)  # then released
        return self.class_low

    def __call__(self, model, step: int, is_main: bool) -> ValidationResult | None:
        p = self.photos_low.shape[0]
        low = torch.cat([self.photos_low, self._class_low()]) if self.stage1 else self.photos_low
        e = torch.cat([self.embeds_by_prompt[self.prompts["instance"]].expand(p, -1, -1)] +
                      ([self.embeds_by_prompt[self.prompts["class"]].expand(self.n, -1, -1)] if self.stage1 else []))
        seeds = [self.seed + runner.STAGE2_SEED_OFFSET + k for k in range(low.shape[0])]
        images = sampling.sample(model, self.scheduler, e, self.negative, self.steps,
                                 self.cfg.stage2.sample.guidance_scale, _gens(seeds),
                                 resolution=model.config.sample_size, lowres=low, noise_level=self.level,
                                 noising_scheduler=self.noising).float().cpu()
        if not is_main:
            return None
        scalars = self.measures(images[:p], images[p:]) if self.measures else {}  # no class part: chain off
        up = torch.nn.functional.interpolate(low, size=images.shape[-1], mode="nearest")
        return ValidationResult(torch.cat([up, images]), low.shape[0], scalars)

    scheduler = None


def partner(cfg: Config, paths: models.ModelPaths, stage: int) -> str | None:
    """The frozen other stage for chained validation, or None when chaining is off. A partner that does
    not chain with the trained stage's sizes is refused here, by the check `cascade sample` makes."""
    vc = (cfg.stage1 if stage == 1 else cfg.stage2).validation
    if not vc.chain:
        return None
    if vc.chain_model:
        key = f"stage{stage}.validation.chain_model"
        try:
            path = models.resolve_name(cfg, vc.chain_model, "stage2" if stage == 1 else "stage1")
        except FileNotFoundError:
            raise ConfigError(f"config '{key}': {vc.chain_model} is neither an existing folder, a hub id nor a "
                              f"model source") from None
        components.check_stage(path, 3 - stage, f"{key} ({path})")
    else:
        key = f"stage{stage}.validation.chain"
        path = components.describe_source(paths.stage2 if stage == 1 else paths.stage1).base
        if not Path(path).is_dir():  # a hub id: loaded (and checked) by the validation itself
            return path
    _check_chain(paths, stage, path, key)
    return path


def _check_chain(paths: models.ModelPaths, stage: int, other: str, key: str):
    """Stage I's size must be what stage II upsamples: `sample`'s check of a cascade, and in stage II's
    case the partner's samples must have the size the trained stage II takes (its photos' low-res views)."""
    try:
        if stage == 1:
            resolutions.check_cascade(paths.stage1, other)
            return
        resolutions.check_cascade(other, paths.stage2)
        low, made = resolutions.stage2_sizes(paths.stage2, paths.stage1)[1], resolutions.stage1_size(other)
        if made != low:
            raise InputError(f"stage I ({other}) makes {made}px images, but stage II trains on {low}px low-res "
                             f"views (stage I {paths.stage1})")
    except InputError as e:
        raise ConfigError(f"config '{key}': {e}") from None


def make(stage: int, cfg: Config, paths: models.ModelPaths, embeds: dict, prompts: dict, scheduler, task,
         held_out: torch.Tensor | None, measures: Measures | None):
    """The validator the trainer calls (None: the stage's own grid, when neither chaining nor measures)."""
    sec = cfg.stage1 if stage == 1 else cfg.stage2
    other = partner(cfg, paths, stage)
    if other is None and measures is None:
        return None
    tc = sec.train
    if stage == 1:
        v = Stage1Validation(cfg, embeds, prompts, tc.validation_images, tc.validation_steps, tc.seed, other, measures)
    else:
        photos = held_out if held_out is not None else \
            data.downsample(task.instance[:tc.validation_images], task.resolution)  # as the stage's own grid
        v = Stage2Validation(cfg, embeds, prompts, photos, tc.validation_images, tc.validation_steps, tc.seed, other,
                             task.lowres, task.noising_scheduler, task.sample_noise_level, measures)
    v.scheduler = scheduler
    if stage == 1:
        what = f"stage I -> stage II ({other})" if other else "stage I alone"
    else:
        what = "subject photo(s) " + ("held out of training" if held_out is not None else "from the training set (none held out)")
        what += f" and stage I ({other}) samples of {prompts['class']!r}, upsampled" if other else ", upsampled"
    log.info("validation: %s%s", what, f"; live measures: {measures.source}" if measures else "")
    return v
