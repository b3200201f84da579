"""`cascade train stage1|stage2`: check every input, encode prompts once, make class images, then
hand embeddings and tensors to the stage's trainer. All cheap checks run before any model loads."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from cascade import identifier as ident
from cascade import models, runs
from cascade.config import Config
from cascade.text import TextEncoder, load_tokenizer
from stages import components, data, setup, stage1, stage2, trainer
from stages.errors import InputError

log = logging.getLogger(__name__)


@dataclass
class TrainRequest:
    stage: int
    cfg: Config
    subject: str
    class_noun: str
    output: str | None = None
    class_dir: str | None = None
    resume: bool = False
    overwrite: bool = False


def _main_first(state, fn):
    """Run fn on the main process, then let the others run it (they then hit caches)."""
    if state.is_main_process:
        result = fn()
    state.wait_for_everyone()
    if not state.is_main_process:
        result = fn()
    return result


def _pick_identifier(req: TrainRequest, text_source: str) -> str:
    idc = req.cfg.identifier
    if idc.token:
        return ident.check_identifier(idc.token, req.class_noun)
    tok = load_tokenizer(text_source)
    token, token_id = ident.pick_identifier(tok, idc.seed, idc.min_id, idc.max_id, idc.max_chars,
                                            avoid=tuple(req.class_noun.lower().split()))
    log.info("identifier: %r (T5 token id %d, seed %d)", token, token_id, idc.seed)
    return token


def _load_subject(req: TrainRequest, train_cfg) -> list:
    size = stage1.RESOLUTION if req.stage == 1 else stage2.RESOLUTION
    return data.load_folder(req.subject, size, "subject", allow_upscale=train_cfg.allow_upscale)


def _subject_tensor(req: TrainRequest, images, train_cfg) -> torch.Tensor:
    if req.stage == 1:
        return data.stack(images, stage1.RESOLUTION)
    size = train_cfg.crop_source_size if train_cfg.random_crop else stage2.RESOLUTION
    return data.stack(images, size)


def _class_images(req, train_cfg, paths: models.ModelPaths, class_dir: Path, embeds: dict, prompts,
                  state) -> torch.Tensor:
    """Existing class images (validated), topped up with generations of the frozen model(s)."""
    from cascade import class_images, runner

    size = stage1.RESOLUTION if req.stage == 1 else stage2.RESOLUTION
    if class_images.existing(class_dir):
        data.load_folder(class_dir, size, "class", allow_upscale=True)
    cfg = req.cfg
    base1 = components.describe_source(paths.stage1).base

    def factory():
        # the frozen base models with the stages' sampling settings; one model resident per pass
        if req.stage == 1:
            return lambda seeds: runner.run_stage1(base1, cfg, embeds[prompts["class"]].expand(len(seeds), -1, -1),
                                                   embeds[""], seeds)
        return runner.class_pair_sampler(cfg, paths, embeds[prompts["class"]], embeds[""])

    files = class_images.generate(class_dir, train_cfg.num_class_images, factory, 8 * cfg.stage1.sample.batch_size,
                                  train_cfg.seed, prompts["class"], state)  # split between processes
    return data.stack(data.load_folder(class_dir, size, "class", allow_upscale=True)[:len(files)], size)


def train(req: TrainRequest) -> trainer.TrainResult:
    from accelerate.utils import broadcast_object_list

    cfg = req.cfg
    sec = cfg.stage1 if req.stage == 1 else cfg.stage2
    tc = sec.train
    state = setup.process_state(cfg.distributed_timeout_minutes)
    if not req.class_noun.strip():
        raise InputError("--class-noun must name the subject's class, e.g. dog")
    setup.early_checks(tc)
    subject_images = _load_subject(req, tc)
    paths = _main_first(state, lambda: models.resolve(cfg))
    model_path = paths.stage1 if req.stage == 1 else paths.stage2
    components.check_stage(model_path, req.stage, f"models.stage{req.stage} ({model_path})")
    token = _pick_identifier(req, paths.text_encoder)
    holder = [None]
    if state.is_main_process:
        holder = [str(runs.prepare_output(req.output, f"stage{req.stage}-{req.class_noun}", req.resume,
                                          req.overwrite))]
    if state.num_processes > 1:
        broadcast_object_list(holder)
    run_dir = Path(holder[0])
    runs.start_logging(run_dir, cfg, state.is_main_process)
    if paths.uses_tiny:
        log.info("weights: tiny random-initialised components (%s); samples will be noise", model_path)

    prompts = {"instance": ident.instance_prompt(token, req.class_noun), "class": ident.class_prompt(req.class_noun)}
    encoder = TextEncoder(paths.text_encoder, cfg.models.cache_dir, cfg.max_text_length,
                          models.weights_dtype(cfg), cfg.models.variant)
    if state.is_main_process:
        encoder.check_lengths(list(prompts.values()))
    embeds = _main_first(state, lambda: encoder.encode([prompts["instance"], prompts["class"], ""]))
    log.info("instance prompt %r, class prompt %r", prompts["instance"], prompts["class"])

    prior = None
    if tc.prior_preservation:
        class_dir = Path(req.class_dir) if req.class_dir else run_dir / "class_images"
        prior = _class_images(req, tc, paths, class_dir, embeds, prompts, state)  # every process takes a share

    instance = _subject_tensor(req, subject_images, tc)
    if req.stage == 1:
        task = stage1.Stage1Task(instance, prior, tc.hflip)
    else:
        noising = components.load_scheduler(paths.stage2, "image_noising_scheduler")
        level = sec.sample.noise_level if sec.sample.noise_level >= 0 else tc.noise_aug_max
        task = stage2.Stage2Task(instance, noising, tc.noise_aug_min, tc.noise_aug_max, prior, tc.random_crop,
                                 tc.hflip, level)
    task.guidance_scale = sec.sample.guidance_scale
    unet = components.load_unet(model_path, torch.float32, cfg.models.variant)
    scheduler = components.load_scheduler(model_path)
    emb = trainer.Embeddings(embeds[prompts["instance"]], embeds[""], embeds[prompts["class"]])
    meta = {"base": components.describe_source(model_path).base, "identifier": token, "class_noun": req.class_noun,
            "instance_prompt": prompts["instance"], "config": cfg.name}
    if req.stage == 2:
        meta.update(noise_aug=[tc.noise_aug_min, tc.noise_aug_max], sample_noise_level=task.sample_noise_level)
    return trainer.train(task, unet, scheduler, emb, tc, run_dir, meta, resume=req.resume,
                         tracker_config={k: str(v) for k, v in vars(tc).items()})
