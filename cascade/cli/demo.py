"""`cascade demo`: the whole mission on one preset, offline on CPU with the tiny default.

Build components, pick an identifier, make class images, train stage I with prior preservation,
train stage II with low noise augmentation, sample through the cascade before and after
fine-tuning with the same prompts and seeds, and write report.html + summary.json.
"""
from __future__ import annotations

import copy
import functools
import json
import logging
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from cascade import model_checks, models, resolutions
from cascade.cli import live_measures
from cascade.cli.beside import Beside
from cascade.runs import folders, html_report
from cascade.config import Config
from cascade.config_checks import validate
from cascade.identifier import check_identifier, pick_identifier
from cascade.runner import grid_caption, run_cascade
from cascade.text import load_tokenizer
from cascade.training import TrainRequest, train
from stages import components, data
from stages.errors import InputError

log = logging.getLogger(__name__)

PROMPTS = ["a [V] {c} on the beach", "a [V] {c} in the snow"]  # DreamBench prompts
TOY_PROMPTS = ["a [V] {c}", "a {c}"]  # the toy world: the subject, and the class (drift)


def synthetic_subject(folder: Path, n: int = 4, size: int = 320) -> Path:
    """A stand-in subject when no photos are at hand: a red toy-like figure on varied backgrounds."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        bg = tuple(int(v) for v in rng.integers(90, 200, 3))
        im = Image.new("RGB", (size, size), bg)
        d = ImageDraw.Draw(im)
        cx, cy = (int(v) for v in rng.integers(size // 3, 2 * size // 3, 2))
        d.ellipse([cx - 60, cy - 40, cx + 60, cy + 70], fill=(200, 30, 40))  # body
        d.ellipse([cx - 35, cy - 100, cx + 35, cy - 30], fill=(220, 60, 60))  # head
        d.rectangle([cx - 20, cy - 75, cx - 8, cy - 63], fill=(20, 20, 20))  # eyes
        d.rectangle([cx + 8, cy - 75, cx + 20, cy - 63], fill=(20, 20, 20))
        im.save(folder / f"{i:02d}.png")
    return folder


def _fast(cfg: Config) -> Config:
    """--fast: the same pipeline with a handful of steps (for tests and quick looks)."""
    cfg = copy.deepcopy(cfg)
    for st in (cfg.stage1, cfg.stage2):
        t = st.train
        t.max_steps, t.checkpoint_every, t.sample_every = 4, 4, 4
        t.validation_images, t.validation_steps, t.num_class_images = 1, 2, 2
        st.sample.steps = 3
    cfg.stage3.steps = 3
    validate(cfg)
    return cfg


def run_demo(cfg: Config, output: str | None = None, subject: str | None = None, class_noun: str | None = None,
             fast: bool = False, with_stage3: bool = False, overwrite: bool = False) -> dict:
    if fast:
        cfg = _fast(cfg)
    user_photos = subject is not None
    if subject is not None:
        subject_note = f"user photos from {subject}"
        if not class_noun:
            raise InputError("--class-noun is required with --subject (the subject's class, e.g. dog)")
    t0 = time.time()
    paths = _check_inputs(cfg, subject, class_noun, with_stage3)  # all stages' inputs, before any folder exists
    build_seconds = round(time.time() - t0, 2)
    root = folders.prepare_output(output, "demo", overwrite=overwrite,
                                  protected={"subject": subject and Path(subject), **folders.model_inputs(paths)})
    folders.start_logging(root, cfg)
    timings = {"build or locate components": build_seconds}

    def lap(name: str, start: float):
        timings[name] = round(time.time() - start, 2)
        log.info("demo: %s took %.1f s", name, timings[name])

    toy = cfg.models.stage1 == "toy"
    if subject is None and toy:  # the toy world's subject, written into the run folder
        from cascade.toy import measure, world

        subject, class_noun = str(measure.write_subject(root / "subject")), class_noun or world.CLASS_NOUN
        subject_note = "the toy world's subject (a purple striped square toy with a black centre spot), 5 photos"
    elif subject is None:  # never a folder outside the repository: synthetic stand-ins
        subject = str(synthetic_subject(root / "subject"))
        class_noun = class_noun or "toy"
        subject_note = "synthetic stand-in images (pass --subject DIR --class-noun NOUN for your own photos)"
    size = resolutions.stage1_size(paths.stage1)
    data.grid([im.resize((128, 128)) for im in data.load_folder(subject, size, "subject")]).save(root / "subject.png")

    t = time.time()
    if not cfg.identifier.token:
        tok = load_tokenizer(paths.text_encoder)
        cfg.identifier.token, token_id = pick_identifier(tok, cfg.identifier.seed, cfg.identifier.min_id,
                                                         cfg.identifier.max_id, cfg.identifier.max_chars,
                                                         avoid=(class_noun,))
        log.info("identifier: %r (T5 token id %d, seed %d, picked by the demo for both stages)",
                 cfg.identifier.token, token_id, cfg.identifier.seed)
    lap("pick identifier", t)
    token = cfg.identifier.token

    prompts = [p.format(c=class_noun).replace("[V]", token) for p in (TOY_PROMPTS if toy else PROMPTS)]
    n_images = (2 if fast else 6) if toy else (1 if fast else 2)
    stage3 = paths.stage3 if with_stage3 else "none"
    if with_stage3 and stage3 == "none":
        stage3 = models.resolve_name(cfg, "tiny", "stage3") if paths.uses_tiny else stage3
    base = models.ModelPaths(paths.stage1, paths.stage2, stage3, paths.text_encoder)

    # what needs no fine-tuned model runs in a process of its own, beside the two trainings: the base
    # cascade's samples and (toy) the SR comparison, the same stage II fine-tune at high augmentation
    jobs = {"sample base cascade": functools.partial(run_cascade, cfg, base, prompts, n_images, 0,
                                                     root / "samples-before", progress=False)}
    if toy:
        from cascade.toy.demo_measures import HIGH_AUG, high_aug_config

        jobs[f"train stage II at augmentation {HIGH_AUG[0]}..{HIGH_AUG[1]}"] = functools.partial(
            train, TrainRequest(2, high_aug_config(cfg), subject, class_noun, output=str(root / "stage2-high")))
    beside = Beside(jobs)
    try:
        t = time.time()
        r1 = train(TrainRequest(1, cfg, subject, class_noun, output=str(root / "stage1"),
                             measures=live_measures.for_training(cfg, 1, subject)))
        lap("class images + train stage I", t)
        beside.release_cores_if_done()
        t = time.time()
        r2 = train(TrainRequest(2, cfg, subject, class_noun, output=str(root / "stage2"),
                             measures=live_measures.for_training(cfg, 2, subject)))
        lap("train stage II", t)
        results = beside.join()
    finally:
        beside.stop()
    timings.update({f"{name} ({beside.where})": sec for name, sec in beside.seconds.items()})
    folders.start_logging(root)  # back to the demo's own log
    tuned = models.ModelPaths(str(r1.export_dir), str(r2.export_dir), stage3, paths.text_encoder)
    t = time.time()
    run_cascade(cfg, tuned, prompts, n_images, 0, root / "samples-after", progress=False)
    lap("sample fine-tuned cascade", t)
    toy_numbers = None
    # the toy readers know the toy world's own subject only: against user photos their numbers mean nothing
    readers_note = (f"the toy world's readers measure its own subject (a purple striped square toy); with your "
                    f"photos ({subject}) they do not apply, so no reader numbers are shown") if toy and user_photos else None
    if readers_note:
        log.info("demo: %s", readers_note)
    if toy and not user_photos:
        from cascade.text import TextEncoder
        from cascade.toy.demo_measures import measure_demo

        t = time.time()
        encoder = TextEncoder(paths.text_encoder, cfg.models.cache_dir, cfg.max_text_length)
        toy_numbers = measure_demo(root, cfg, base, tuned, prompts, n_images, encoder,
                                   str(results[-1].export_dir))
        lap("read samples (toy readers)", t)
    timings["total"] = round(time.time() - t0, 2)

    weights = ("the toy world's pretrained cascade (cascade/toy/weights, 16 -> 64 px): a small learned procedural "
               "world, not real photos; the same commands run on IF with --config if-xl --subject DIR --class-noun NOUN"
               ) if toy else ("tiny random-initialised components built locally: every image below is noise by construction, "
               "the demo shows the pipeline, not image quality") if paths.uses_tiny else \
        f"stage I {paths.stage1}, stage II {paths.stage2}, stage III {stage3}"
    summary = {
        "config": cfg.name, "weights": weights, "random_weights": paths.uses_tiny, "subject": subject,
        "subject_note": subject_note, "class_noun": class_noun, "identifier": token, "prompts": prompts,
        "images_per_prompt": n_images, "fast": fast, "grid_layout": grid_caption(len(prompts), n_images),
        "stage1": {"run": "stage1", "steps": r1.steps, "final_instance_loss": r1.losses[-1]["instance_loss"],
                   "final_prior_loss": r1.losses[-1]["prior_loss"], "seconds": round(r1.seconds, 2),
                   "prior_weight": cfg.stage1.train.prior_weight, "lora_rank": cfg.stage1.train.lora_rank},
        "stage2": {"run": "stage2", "steps": r2.steps, "final_instance_loss": r2.losses[-1]["instance_loss"],
                   "seconds": round(r2.seconds, 2),
                   "noise_aug": [cfg.stage2.train.noise_aug_min, cfg.stage2.train.noise_aug_max],
                   "sample_noise_level": json.loads((r2.export_dir / "cascade.json").read_text())["sample_noise_level"]},
        "stage3": stage3, "timings_seconds": timings, "toy": toy_numbers, "readers_note": readers_note,
    }
    summary["report"] = str(html_report.write_report(root, summary))
    summary["summary"] = str(root / "summary.json")
    (root / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _check_inputs(cfg: Config, subject: str | None, class_noun: str | None, with_stage3: bool) -> models.ModelPaths:
    """What would otherwise fail halfway: photos too small for stage II (found only after stage I
    trained), a bad identifier, unloadable or wrong-stage models."""
    if cfg.identifier.token and class_noun:
        check_identifier(cfg.identifier.token, class_noun)
    paths = models.resolve(cfg)
    model_checks.check_models(paths, cfg.models.variant, (1, 2, 3) if with_stage3 else (1, 2))
    components.check_stage(paths.stage1, 1, f"models.stage1 ({paths.stage1})")
    components.check_stage(paths.stage2, 2, f"models.stage2 ({paths.stage2})")
    if subject is not None:
        high, low = resolutions.stage2_sizes(paths.stage2, paths.stage1)
        data.load_folder(subject, low, "subject", allow_upscale=cfg.stage1.train.allow_upscale)
        data.load_folder(subject, high, "subject", allow_upscale=cfg.stage2.train.allow_upscale)
    return paths
