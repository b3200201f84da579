"""`cascade evaluate`: the DreamBench protocol for one subject per call, into a run folder that
collects every subject evaluated into it.

Images are generated through the cascade runner (so `accelerate launch` splits them over GPUs) into
RUN/<subject>/<label>/pNN-kK.png (prompt NN, image K) and class-kK.png ("a <class>", for PRES);
images already there are kept, so an interrupted evaluation resumes where it stopped. Or a folder
of images named that way is scored as it is (--images). Scores go to RUN/<subject>/scores.json; the
tables, JSON and plot over all subjects in RUN are rewritten after each call (cascade.eval_report).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path


from cascade import model_checks, models, runner
from cascade.evaluation import dreambench_folder, dreambench_report, metrics
from cascade.runs import folders
from cascade.config import Config
from cascade.identifier import class_prompt
from cascade.evaluation.image_metrics import Lpips
from stages import components, data, setup
from stages.errors import InputError

log = logging.getLogger(__name__)

CLASS_SEED_OFFSET = 100_000  # class-prompt images use seeds apart from the prompt images'
NAME = re.compile(r"^(p(\d{2})|class)-k(\d+)\.png$")


@dataclass
class EvalRequest:
    cfg: Config
    subject: str  # folder of the subject's real photos
    class_noun: str | None = None  # default: the dataset's class for the subject's folder name
    identifier: str | None = None  # default: the one the stage I export was trained with
    dataset: str | None = None  # folder with prompts_and_classes.txt; default: the packaged copy
    stage1: str | None = None  # fine-tuned (or any) stages to evaluate; default: the config's models
    stage2: str | None = None
    images: str | None = None  # score this folder instead of generating
    baseline: bool = False
    baseline_images: str | None = None
    num_images: int = 4  # K images per prompt (the paper's 4)
    num_class_images: int = 4  # "a <class>" images for PRES
    max_prompts: int = 25
    seed: int = 0
    chunk: int = 5  # prompts per runner call: an interruption loses at most one chunk
    output: str | None = None
    dino: str = metrics.DEFAULT_DINO
    clip: str = metrics.DEFAULT_CLIP
    lpips_net: str = "alex"


def _checked(req: EvalRequest):
    """Every cheap check, before any model loads or folder is created."""
    for name in ("num_images", "num_class_images", "max_prompts", "chunk"):
        if getattr(req, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(req, name)}")
    bench = metrics.load_dreambench(req.dataset)
    subject_name = Path(req.subject).name
    class_noun = req.class_noun or bench.classes.get(subject_name)
    if not class_noun:
        raise InputError(f"--class-noun is needed: '{subject_name}' is not a subject of {bench.source}")
    real = data.load_folder(req.subject, 1, "subject")
    for folder in (req.images, req.baseline_images):
        if folder and not Path(folder).is_dir():
            raise InputError(f"--images folder not found: {folder}")
    return bench, subject_name, class_noun, real


def _paths(req: EvalRequest) -> tuple[models.ModelPaths, models.ModelPaths]:
    """(evaluated stages, their base models) as ModelPaths."""
    cfg = req.cfg
    paths = models.resolve(cfg)
    for stage in ("stage1", "stage2"):
        if getattr(req, stage):
            paths = dataclasses.replace(paths, **{stage: models.resolve_name(cfg, getattr(req, stage), stage)})
    base = dataclasses.replace(paths, stage1=components.describe_source(paths.stage1).base,
                               stage2=paths.stage2 if paths.stage2 == "none"
                               else components.describe_source(paths.stage2).base)
    return dataclasses.replace(paths, stage3="none"), dataclasses.replace(base, stage3="none")


def _identifier(req: EvalRequest, paths: models.ModelPaths) -> str | None:
    if req.identifier:
        return req.identifier
    return (components.describe_source(paths.stage1).meta or {}).get("identifier")


def _jobs(prompts: list[str], class_noun: str, req: EvalRequest) -> list[tuple[str, str, int, int]]:
    """(name, prompt, images, first seed) per prompt; the class prompt last."""
    k = req.num_images
    jobs = [(f"p{i:02d}", p, k, req.seed + i * k) for i, p in enumerate(prompts)]
    return jobs + [("class", class_prompt(class_noun), req.num_class_images, req.seed + CLASS_SEED_OFFSET)]


def _missing(folder: Path, jobs) -> list:
    return [j for j in jobs if any(not (folder / f"{j[0]}-k{k}.png").is_file() for k in range(j[2]))]


def _groups(jobs, chunk: int):
    """Runs of consecutive prompt jobs (same K, contiguous seeds) of at most `chunk` prompts."""
    group = []
    for job in jobs:
        if group and (len(group) == chunk or job[2] != group[-1][2] or job[3] != group[-1][3] + job[2]):
            yield group
            group = []
        group.append(job)
    if group:
        yield group


def generate(cfg: Config, paths: models.ModelPaths, folder: Path, jobs, chunk: int, encoder=None):
    """Generate every missing image of `jobs` into `folder` through the cascade runner."""
    from cascade.text import TextEncoder

    state = setup.process_state()
    state.wait_for_everyone()
    todo = _missing(folder, jobs)
    if not todo:
        log.info("%s: all images present", folder)
        return
    encoder = encoder or TextEncoder(paths.text_encoder, cfg.models.cache_dir, cfg.max_text_length,
                                     models.weights_dtype(cfg), cfg.models.variant,
                                     device=models.text_encoder_device(cfg))
    final = "stage1" if paths.stage2 == "none" else "stage2"
    for group in _groups(todo, chunk):
        tmp = folder / f".gen-{group[0][0]}"
        k = group[0][2]
        log.info("%s: generating %s (%d images each)", folder, ", ".join(j[0] for j in group), k)
        runner.run_cascade(cfg, paths, [j[1] for j in group], k, group[0][3], tmp, encoder=encoder, progress=False)
        if state.is_main_process:
            for i, job in enumerate(group):
                for kk in range(k):
                    target = folder / f"{job[0]}-k{kk}.png"
                    if not target.exists():  # images already there are kept as they are
                        os.replace(tmp / final / f"{i * k + kk:05d}.png", target)
            shutil.rmtree(tmp)  # the runner's scratch folder, made by this call
        state.wait_for_everyone()


def _collect(folder: Path, keep: set[str] | None = None) -> tuple[dict, list]:
    """{prompt index: [(k, path)]} and [(k, path)] of class images, from the file names."""
    prompt_files, class_files = {}, []
    for f in sorted(folder.iterdir()):
        m = NAME.match(f.name)
        if not m or (keep is not None and f.name not in keep):
            continue
        if m.group(2) is None:
            class_files.append((int(m.group(3)), f))
        else:
            prompt_files.setdefault(int(m.group(2)), []).append((int(m.group(3)), f))
    if not prompt_files:
        raise InputError(f"{folder}: no images named pNN-kK.png (NN = prompt index, K = image index)")
    return prompt_files, class_files


def _open(paths) -> list:
    from PIL import Image

    return [Image.open(p).convert("RGB") for p in paths]


def score_folder(folder: Path, label: str, templates: list[str], class_noun: str, identifier: str | None,
                 real: dict, scorers: tuple, keep: set[str] | None = None) -> dict:
    """Per-image rows, per-prompt rows and the summary of one model's images of one subject (of the
    files named in `keep` when given)."""
    dino, clip, lpips = scorers
    prompt_files, class_files = _collect(folder, keep)
    bad = [i for i in prompt_files if i >= len(templates)]
    if bad:
        raise InputError(f"{folder}: prompt index {bad[0]} is beyond the {len(templates)} prompts for '{class_noun}'")
    order = sorted(prompt_files)
    texts = {i: metrics.clip_t_prompt(templates[i], class_noun) for i in order}
    text_feats = dict(zip(order, clip.embed_text(list(texts.values()))))
    images, per_prompt = [], []
    for i in order:
        files = sorted(prompt_files[i])
        ims = _open([f for _, f in files])
        d = metrics.mean_cosine(dino.embed(ims), real["dino"])
        ci_feats = clip.embed(ims)
        c = metrics.mean_cosine(ci_feats, real["clip"])
        t = ci_feats @ text_feats[i]
        prompt = metrics.fill(templates[i], identifier or "[V]", class_noun)
        for (k, f), a, b, tt in zip(files, d.tolist(), c.tolist(), t.tolist()):
            images.append({"model": label, "prompt_index": i, "k": k, "file": f.name, "prompt": prompt,
                           "clip_t_prompt": texts[i], "dino": a, "clip_i": b, "clip_t": tt})
        div = lpips.mean_pairwise([data.to_tensor(im, im.size[0]) for im in ims]) if lpips.available else None
        per_prompt.append({"model": label, "prompt_index": i, "prompt": prompt, "n": len(ims),
                           "dino": d.mean().item(), "clip_i": c.mean().item(), "clip_t": t.mean().item(), "div": div})
    pres = None
    if class_files:
        pres = metrics.mean_cosine(dino.embed(_open([f for _, f in sorted(class_files)])), real["dino"]).mean().item()
    divs = [p["div"] for p in per_prompt if p["div"] is not None]
    mean = lambda key: sum(r[key] for r in images) / len(images)  # noqa: E731
    summary = {"model": label, "images": len(images), "prompts": len(per_prompt), "dino": mean("dino"),
               "clip_i": mean("clip_i"), "clip_t": mean("clip_t"), "pres": pres,
               "div": sum(divs) / len(divs) if divs else None, "class_images": len(class_files)}
    return {"images": images, "prompts": per_prompt, "summary": summary}


def _real_features(real_images: list, dino, clip) -> dict:
    feats = {"dino": dino.embed(real_images), "clip": clip.embed(real_images)}
    if len(real_images) > 1:  # the paper's "real images" row: each photo against the others
        feats["row"] = {"model": "real images", "images": len(real_images),
                        "dino": metrics.mean_cosine(feats["dino"], feats["dino"], True).mean().item(),
                        "clip_i": metrics.mean_cosine(feats["clip"], feats["clip"], True).mean().item()}
    return feats


def run_evaluate(req: EvalRequest) -> Path | None:
    """Returns the run folder (main process) after writing scores and reports."""

    bench, subject_name, class_noun, real_images = _checked(req)
    templates = bench.templates(class_noun)[:req.max_prompts]
    needs_models = not req.images or (req.baseline and not req.baseline_images)
    paths, base = _paths(req) if needs_models else (None, None)
    identifier = _identifier(req, paths) if paths else req.identifier
    generating = [("fine-tuned", paths)] if not req.images else []
    if req.baseline and not req.baseline_images:
        generating.append(("base", base))
    if generating and not identifier:
        raise InputError(f"no identifier: stage I ({paths.stage1}) is not a fine-tuned export; pass --identifier")
    for _, p in generating:  # an uncached hub model without network: one line after one probe, as train says
        model_checks.check_models(p, req.cfg.models.variant, (1,) if p.stage2 == "none" else (1, 2))
        components.check_stage(p.stage1, 1, "stage I model")
        if p.stage2 != "none":
            components.check_stage(p.stage2, 2, "stage II model")
    identities = {label: dreambench_folder.images_identity(req.cfg, p, identifier, class_noun,
                                                           bench.templates(class_noun), req)
                  for label, p in generating}
    out_dir = Path(req.output) if req.output else None
    dreambench_folder.check_folder(req.output)  # read only, before any model loads
    dreambench_folder.check_subject(req.output, subject_name, req.subject)
    if out_dir is not None:
        for label in identities:
            dreambench_folder.check_images(out_dir / subject_name / label, identities[label])
    cache = req.cfg.models.cache_dir
    from cascade.offline.tiny_metrics import resolve_metric_model

    state = setup.process_state()
    scorers = None
    if state.is_main_process:  # metric models load before any folder is made: a missing one stops here
        device = str(runner.device())
        dino = metrics.DinoScorer(resolve_metric_model(req.dino, cache, "dino"), device)
        clip = metrics.ClipScorer(resolve_metric_model(req.clip, cache, "clip"), device)
        scorers = (dino, clip, Lpips(req.lpips_net))
    # an evaluation folder collects every subject evaluated into it; the images kept in it are reused
    # only when the same setup made them (cascade.evaluation.dreambench_folder)
    out = folders.prepare_on_main(state, lambda: dreambench_folder.open_folder(req.output, subject_name))
    folders.start_logging(out, req.cfg, state.is_main_process)
    prompts = [metrics.fill(t, identifier, class_noun) for t in templates] if identifier else []
    jobs = _jobs(prompts, class_noun, req)
    for label, p in generating:
        folder = out / subject_name / label
        if state.is_main_process:
            dreambench_folder.check_images(folder, identities[label])
            dreambench_folder.record_images(folder, identities[label])
        generate(req.cfg, p, folder, jobs, req.chunk)
    if not state.is_main_process:
        return None
    sources = [(label, out / subject_name / label) for label, _ in generating]
    sources += [(lab, Path(f)) for lab, f in (("fine-tuned", req.images), ("base", req.baseline_images)) if f]
    real = _real_features(real_images, scorers[0], scorers[1])
    result = {"subject": subject_name, **dreambench_folder.subject_record(req.subject),
              "class_noun": class_noun, "identifier": identifier,
              "subject_type": "live" if class_noun in metrics.LIVE_CLASSES else "object",
              "prompts_source": bench.source, "real": real.get("row"),
              "clip_t_prompts": "identifier removed, class kept (e.g. 'a dog in the snow')",
              "metric_models": metrics.describe_models(*scorers[:2], scorers[2].reason),
              "random_weights": {"cascade": bool(generating) and paths.uses_tiny, "dino": scorers[0].random, "clip": scorers[1].random},
              "sources": {label: str(f) for label, f in sources}, "models": {}}
    made = {f"{j[0]}-k{k}.png" for j in jobs for k in range(j[2])}  # only what this call asked for
    for label, folder in sources:
        keep = made if label in identities else None
        scored = score_folder(folder, label, templates, class_noun, identifier, real, scorers, keep)
        result["models"][label] = scored
    (out / subject_name).mkdir(parents=True, exist_ok=True)
    tmp = out / subject_name / "scores.json.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, out / subject_name / "scores.json")
    dreambench_report.write(out, scorers[2].reason)
    return out
