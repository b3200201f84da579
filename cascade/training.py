"""`cascade train stage1|stage2`: check every input, encode prompts once, make class images, then
hand embeddings and tensors to the stage's trainer. All cheap checks run before any model loads."""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from cascade import captions as caps
from cascade import identifier as ident
from cascade import model_checks, models, resolutions, validation
from cascade.runs import early_log, folders, markers
from cascade.config import Config, ConfigError
from cascade.text import TextEncoder, load_tokenizer
from stages import best, checkpoint, components, data, engines, setup, stage1, stage2, trainer
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
    # live validation measures, handed in by the command layer (cascade.validation.Measures; the core
    # never imports the toy readers or the metric models)
    measures: object | None = None


def _pick_identifier(req: TrainRequest, text_source: str) -> str:
    idc = req.cfg.identifier
    if idc.token:
        token = ident.check_identifier(idc.token, req.class_noun)
        log.info("identifier: %r (from identifier.token / --identifier)", token)
        return token
    tok = load_tokenizer(text_source)
    token, token_id = ident.pick_identifier(tok, idc.seed, idc.min_id, idc.max_id, idc.max_chars,
                                            avoid=tuple(req.class_noun.lower().split()))
    log.info("identifier: %r (T5 token id %d, seed %d)", token, token_id, idc.seed)
    return token


def _sizes(req: TrainRequest, paths: models.ModelPaths) -> tuple[int, int | None]:
    """(training resolution, stage II low-res size or None) from the models' UNet configs."""
    if req.stage == 1:
        return resolutions.stage1_size(paths.stage1), None
    return resolutions.stage2_sizes(paths.stage2, paths.stage1)


def _subject_tensor(req: TrainRequest, images, train_cfg, size: int) -> torch.Tensor:
    if req.stage == 2 and train_cfg.random_crop:
        size = train_cfg.crop_source_size
    return data.stack(images, size)


def _class_images(req, train_cfg, paths: models.ModelPaths, class_dir: Path, embeds: dict, prompts,
                  size: int, state) -> torch.Tensor:
    """Existing class images (validated), topped up with generations of the frozen model(s)."""
    from cascade import class_images, runner

    bases = [components.describe_source(getattr(paths, f"stage{s}")).base for s in range(1, req.stage + 1)]
    made_by = {"model": class_images.model_name(*bases), "size": size}
    class_images.check_manifest(class_dir, prompts["class"], req.stage, **made_by)
    n = train_cfg.num_class_images
    have = class_images.existing(class_dir)
    if have:  # validated before any generation
        loaded = data.load_folder(class_dir, size, "class", allow_upscale=True)
        if len(have) >= n:  # nothing to generate: no second read
            return data.stack(loaded[:n], size)
    cfg = req.cfg
    base1 = components.describe_source(paths.stage1).base

    def factory():
        # the frozen base models with the stages' sampling settings; one model resident per pass
        if req.stage == 1:
            return lambda seeds: runner.run_stage1(base1, cfg, embeds[prompts["class"]].expand(len(seeds), -1, -1),
                                                   embeds[""], seeds)
        return runner.class_pair_sampler(cfg, paths, embeds[prompts["class"]], embeds[""])

    files = class_images.generate(class_dir, n, factory, 8 * cfg.stage1.sample.batch_size,
                                  train_cfg.seed, prompts["class"], req.stage, state, **made_by)  # split between processes
    return data.stack(data.load_folder(class_dir, size, "class", allow_upscale=True)[:len(files)], size)


def _check_request(req: TrainRequest, sec):
    """Mismatches that are legal but almost surely unintended (warned), or plainly wrong (refused)."""
    from cascade import class_images

    tc, level = sec.train, sec.sample.noise_level
    if req.stage == 2 and level >= 0 and not tc.noise_aug_min <= level <= tc.noise_aug_max:
        log.warning("stage II samples at noise level %d, outside the training range %d..%d: the fine-tuned model "
                    "never saw that level", level, tc.noise_aug_min, tc.noise_aug_max)
    if req.class_dir and markers.inside(req.class_dir, req.subject) and markers.inside(req.subject, req.class_dir):
        raise InputError(f"--class-dir {req.class_dir} is the subject folder: the photos would be taken as prior "
                         f"(class) images and generated images would land among them; give another folder")
    if tc.prior_preservation and req.class_dir:
        class_images.check_manifest(Path(req.class_dir), ident.class_prompt(req.class_noun), req.stage)


def train(req: TrainRequest) -> trainer.TrainResult:
    cfg = req.cfg
    sec = cfg.stage1 if req.stage == 1 else cfg.stage2
    tc = sec.train
    state = setup.process_state(cfg.distributed_timeout_minutes)
    log_mark = early_log.mark()  # what is logged before the run folder exists still reaches its log.txt
    if not req.class_noun.strip():
        raise InputError("--class-noun must name the subject's class, e.g. dog")
    setup.early_checks(tc)
    _check_request(req, sec)
    paths = engines.main_first(state, lambda: models.resolve(cfg))
    model_path = paths.stage1 if req.stage == 1 else paths.stage2
    model_checks.check_trainable(model_path, req.stage)
    model_checks.check_models(paths, cfg.models.variant, (1, 2) if req.stage == 2 and tc.prior_preservation else
                              (req.stage,))
    components.check_stage(model_path, req.stage, f"models.stage{req.stage} ({model_path})")
    chain = validation.partner(cfg, paths, req.stage)  # a bad validation.chain_model stops here, before any folder
    size, lowres = _sizes(req, paths)
    if req.stage == 2 and tc.random_crop and tc.crop_source_size < size:
        raise ConfigError(f"stage2.train.crop_source_size: must be >= stage II's resolution {size} (random "
                          f"{size}px crops are cut from it), got {tc.crop_source_size}")
    subject_images = data.load_folder(req.subject, size, "subject", allow_upscale=tc.allow_upscale)
    held_out, subject_images = _hold_out(subject_images, sec.validation.holdout, size)
    validation.check_best(f"stage{req.stage}.validation", sec.validation, req.measures, tc.validation_images)
    token = _pick_identifier(req, paths.text_encoder)
    captions = caps.read_captions(req.subject, tc.captions, token)  # None unless opted in
    run_dir = folders.prepare_on_main(state, lambda: folders.prepare_output(
        req.output, f"stage{req.stage}-{req.class_noun}", req.resume, req.overwrite,
        _run_identity(req, token, paths, model_path),
        {"subject": Path(req.subject), "class": req.class_dir and Path(req.class_dir),
         "validation.chain_model": chain, **folders.model_inputs(paths, "stage1", "stage2", "text_encoder")}))
    folders.start_logging(run_dir, cfg, state.is_main_process)
    early_log.replay_since(log_mark)
    if req.resume and (latest := checkpoint.latest_checkpoint(run_dir / "checkpoints")) is not None:
        checkpoint.check_files(latest)  # a crafted checkpoint file is refused before any model loads
    if paths.uses_tiny:
        log.info("weights: tiny random-initialised components (%s); samples will be noise", model_path)

    prompts = {"instance": ident.instance_prompt(token, req.class_noun), "class": ident.class_prompt(req.class_noun)}
    encoder = TextEncoder(paths.text_encoder, cfg.models.cache_dir, cfg.max_text_length,
                          models.weights_dtype(cfg), cfg.models.variant, device=models.text_encoder_device(cfg))
    texts = [prompts["instance"], prompts["class"], ""] + (captions or [])
    if state.is_main_process:
        encoder.check_lengths(list(dict.fromkeys(texts[:2] + texts[3:])))
    embeds = engines.main_first(state, lambda: encoder.encode(texts))  # every caption too: T5 once, before any UNet
    log.info("instance prompt %r, class prompt %r%s", prompts["instance"], prompts["class"],
             f", {len(set(captions))} distinct per-image captions ({tc.captions})" if captions else "")

    prior = None
    if tc.prior_preservation:
        class_dir = Path(req.class_dir) if req.class_dir else run_dir / "class_images"
        prior = _class_images(req, tc, paths, class_dir, embeds, prompts, size, state)  # every process takes a share

    instance = _subject_tensor(req, subject_images, tc, size)
    if req.stage == 1:
        task = stage1.Stage1Task(instance, prior, tc.hflip, resolution=size)
    else:
        noising = components.load_scheduler(paths.stage2, "image_noising_scheduler")
        level = sec.sample.noise_level if sec.sample.noise_level >= 0 else tc.noise_aug_max
        task = stage2.Stage2Task(instance, noising, tc.noise_aug_min, tc.noise_aug_max, prior, tc.random_crop,
                                 tc.hflip, level, resolution=size, lowres=lowres)
    task.guidance_scale = sec.sample.guidance_scale
    if captions:
        task.set_captions(torch.cat([embeds[c] for c in captions]), embeds[prompts["class"]])
    # weights_dtype (issue 11): bf16/fp16 master weights, or the frozen base of a LoRA run
    unet = components.load_unet(model_path, components.DTYPES[tc.weights_dtype], cfg.models.variant)
    scheduler = components.load_scheduler(model_path)
    emb = trainer.Embeddings(embeds[prompts["instance"]], embeds[""], embeds[prompts["class"]])
    meta = {"base": components.portable_base(components.describe_source(model_path).base, run_dir / "export"),
            "identifier": token, "class_noun": req.class_noun,
            **model_checks.subject_record(req.subject),  # which photos: sampling warns on a stage I/II mix
            "instance_prompt": prompts["instance"], "config": cfg.name, "resolution": size, "captions": tc.captions}
    if req.stage == 2:
        meta.update(noise_aug=[tc.noise_aug_min, tc.noise_aug_max], sample_noise_level=task.sample_noise_level,
                    lowres_size=lowres)
    validator = validation.make(req.stage, cfg, paths, embeds, prompts, scheduler, task, held_out, req.measures)
    vc = sec.validation
    rule = best.BestRule(vc.best_fidelity, vc.best_drift, vc.drift_budget) if vc.best_checkpoint else None
    result = trainer.train(task, unet, scheduler, emb, tc, run_dir, meta, resume=req.resume,
                           tracker_config={k: str(v) for k, v in vars(tc).items()}, validator=validator,
                           best_rule=rule)
    if result.export_dir is not None:  # the main process: README.md in the Hugging Face model card convention
        from cascade import model_card

        model_card.write_model_card(result.export_dir, run_dir)
    markers.release(run_dir)
    return result


def _hold_out(images: list, k: int, size: int):
    """(the last k photos as a [k, 3, S, S] tensor or None, the photos left for training)."""
    if k == 0:
        return None, images
    if k >= len(images):
        raise ConfigError(f"config 'stage2.validation.holdout': {k} held-out photos leave none of the subject's "
                          f"{len(images)} for training")
    return data.stack(images[-k:], size), images[:-k]


def _run_identity(req: TrainRequest, token: str, paths: models.ModelPaths, model_path: str) -> dict:
    """What a run trains on, recorded in its marker: --resume must match it (cascade.run_folder)."""
    def where(p):
        return str(Path(p).resolve()) if p and Path(p).exists() else p

    sec = req.cfg.stage1 if req.stage == 1 else req.cfg.stage2
    run = {"stage": req.stage, "subject": where(req.subject), "subject_sha256": markers.folder_digest(req.subject),
           "class_noun": req.class_noun, "identifier": token,
           "model": where(model_path), "text_encoder": where(paths.text_encoder),
           "class_dir": str(Path(req.class_dir).resolve()) if req.class_dir else None,
           "variant": req.cfg.models.variant, "max_text_length": req.cfg.max_text_length,
           "train": dataclasses.asdict(sec.train)}
    if req.stage == 2:
        run["sample_noise_level"] = sec.sample.noise_level
    return {"command": f"train stage{req.stage}", "run": run}
