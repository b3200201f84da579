"""`cascade study-sr`: what super-resolution fine-tuning and its noise augmentation do.

Sweep: seed x SR model (the base model, given fine-tuned exports, and with `--train` variants
fine-tuned here, per seed, at their training augmentation, optionally with prior preservation) x
sampling `noise_level`. Inputs: the subject's real photos downsampled to stage I's resolution, split
into training views and `holdout` held-out views the variants never train on (plus `fresh_views`,
e.g. new renders of a toy subject; ground truth exists: PSNR, SSIM, LPIPS, HF ratio, high-pass
correlation, DINO, `truth_readers`), stage I samples of "a [V] <class>" (no ground truth: HF ratio
against the real photos' mean, DINO) and `class_inputs`, low-res views of other objects, where the
`readers` count the subject's detail drifting onto what is not the subject. Every model sees the
same inputs with the same seeds, so differences are the model's.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cascade import identifier as ident
from cascade import model_sources, models, resolutions, runner
from cascade.evaluation import metrics, sr_control, sr_study_report
from cascade.runs import folders
from cascade.config import Config
from cascade.evaluation.image_metrics import Lpips, hf_energy, hf_ratio, hp_correlation, psnr, ssim
from cascade.text import TextEncoder, load_tokenizer
from stages import components, data, noise_aug, sampling
from stages.errors import InputError

log = logging.getLogger(__name__)
INSTANCE_VIEW = sr_study_report.INSTANCE_VIEW  # other objects upsampled under the instance prompt
CONTROL_IMAGES = 8  # photos the positive control reads per model and seed


@dataclass
class StudyRequest:
    cfg: Config
    subject: str
    class_noun: str
    identifier: str | None = None
    base: str | None = None  # base SR model; default the base of models.stage2
    sr: list = field(default_factory=list)  # [(label, export path)]
    variants: list = field(default_factory=list)  # [(name, aug_min, aug_max[, prior])] to fine-tune (--train)
    levels: list = field(default_factory=lambda: [0, 1, 5, 20, 50, 100, 250])
    stage1: str | None = None  # stage I for sample inputs; "none" = real photos only
    num_stage1: int = 2
    max_images: int = 4
    seed: int = 0
    dino: str = metrics.DEFAULT_DINO  # or "none", or "tiny"
    lpips_net: str = "alex"
    output: str | None = None
    overwrite: bool = False
    # extra per-image measures {name: fn(image [3, H, W] in [-1, 1]) -> float}, on every input (the toy
    # world's exact readers: does the SR output show the subject's stripes, its emblem)
    readers: dict = field(default_factory=dict)
    seeds: list | None = None  # fine-tuning + sampling seeds (default [seed]); one sweep each
    holdout: int | None = None  # photos kept out of --train (default 1 with >= 4 photos, else 0)
    fresh_views: torch.Tensor | None = None  # more held-out ground truth [N, 3, H, W] at the SR output size
    class_inputs: torch.Tensor | None = None  # low-res views of other objects [N, 3, h, w] (drift)
    class_stage1: int = 0  # base stage I samples of "a <class>" added to the class inputs
    # {name: fn(output, truth) -> float} on inputs with ground truth (toy: freckle position F1)
    truth_readers: dict = field(default_factory=dict)
    class_dir: str | None = None  # class pairs for prior-preservation variants (made by the frozen cascade)
    settings: list = field(default_factory=list)  # which step settings applied and why (study_grid.steps), logged


def _identifier(req: StudyRequest, sr_paths: list[str], stage1_path: str, text_source: str) -> str:
    if req.identifier:
        return ident.check_identifier(req.identifier, req.class_noun)
    for p in sr_paths + ([stage1_path] if stage1_path != "none" else []):
        meta = components.describe_source(p).meta or {}
        if meta.get("identifier"):
            return meta["identifier"]
    idc = req.cfg.identifier
    token, _ = ident.pick_identifier(load_tokenizer(text_source), idc.seed, idc.min_id, idc.max_id, idc.max_chars,
                                     avoid=tuple(req.class_noun.lower().split()))
    return token


def variant_label(name: str, lo: int, hi: int, prior: bool = False) -> str:
    return f"{name} (aug {lo}..{hi}{', prior' if prior else ''})"


def _train_variants(req: StudyRequest, base: str, token: str, subject: str, out: Path, seed: int,
                    progress) -> list[tuple[str, str, dict]]:
    from cascade.config_checks import validate
    from cascade.training import TrainRequest, train

    trained = []
    for name, lo, hi, *rest in req.variants:
        prior = bool(rest and rest[0])
        cfg = dataclasses.replace(req.cfg)
        cfg.models = dataclasses.replace(req.cfg.models, stage2=base)
        cfg.identifier = dataclasses.replace(req.cfg.identifier, token=token)
        # the study samples and measures the exports itself: no validation grids while training
        t = dataclasses.replace(req.cfg.stage2.train, noise_aug_min=lo, noise_aug_max=hi, seed=seed,
                                prior_preservation=prior, validation_images=0)
        cfg.stage2 = dataclasses.replace(req.cfg.stage2, train=t, sample=dataclasses.replace(req.cfg.stage2.sample,
                                                                                              noise_level=-1),
                                         validation=dataclasses.replace(req.cfg.stage2.validation, best_checkpoint=False))
        validate(cfg)
        log.info("training SR variant %s (seed %d): noise augmentation %d..%d, %d steps%s", name, seed, lo, hi,
                 t.max_steps, ", prior preservation" if prior else "")
        result = train(TrainRequest(2, cfg, subject, req.class_noun, str(out / "train" / f"seed{seed}" / name),
                                    class_dir=(req.class_dir or str(out / "class_images")) if prior else None))
        trained.append((variant_label(name, lo, hi, prior), str(result.export_dir),
                        {"train_aug": f"{lo}:{hi}", "prior": prior}))
        progress.done("train")
    return trained


class Progress:
    """Counts the sweep's parts (training runs and sampled images) and logs the elapsed time and an
    ETA for the whole sweep: each kind's remaining count times its measured mean duration (ETA "?"
    until an image has been sampled; a training run not yet timed is guessed at `train_weight` images)."""

    def __init__(self, trainings: int, images: int, train_weight: float):
        self.left = {"train": trainings, "image": images}
        self.spent, self.count = {"train": 0.0, "image": 0.0}, {"train": 0, "image": 0}
        self.weight, self.t0, self.last = train_weight, time.time(), time.time()

    def done(self, kind: str, n: int = 1):
        now = time.time()
        self.spent[kind] += now - self.last
        self.count[kind] += n
        self.left[kind] -= n
        self.last = now
        per = {k: self.spent[k] / self.count[k] for k in self.count if self.count[k]}
        if "train" not in per:
            per["train"] = per["image"] * self.weight
        # a training run tells little about sampling cost (loading, class images): no ETA before an image is timed
        eta = sum(max(0, self.left[k]) * per[k] for k in per) if "image" in per else float("nan")
        total = sum(self.count.values()) + sum(max(0, v) for v in self.left.values())
        log.info("study-sr progress %d/%d parts (elapsed %s, ETA %s)", sum(self.count.values()), total,
                 _hms(now - self.t0), _hms(eta))

    def skip(self):
        """Time spent outside the counted parts (loading, stage I samples) is not charged to either kind."""
        self.last = time.time()


def _hms(s: float) -> str:
    return "?" if math.isnan(s) else f"{int(s) // 60}m{int(s) % 60:02d}s"


@torch.no_grad()
def _upsample_all(path: str, cfg: Config, lowres: torch.Tensor, embeds, negative, levels: list[int],
                  seed: int, noise_ids: list[int], progress: Progress | None = None,
                  control=None) -> tuple[dict[int, torch.Tensor], dict | None]:
    """(level -> SR outputs for every input (`embeds` [N, L, D]: each input's prompt), the positive
    control's condition read on `control` = (photos, their embeds, low-res size), or None); one model
    resident for the whole sweep; image i always uses seed + noise_ids[i], whatever the model or level
    (an input upsampled under two prompts keeps its sampling noise)."""
    s = cfg.stage2.sample
    out, read = {}, None
    with runner.resident(path, cfg, ("scheduler", "image_noising_scheduler")) as (unet, sched, noising):
        if control is not None:
            read = sr_control.condition_read(unet, sched, noising, control[1], control[0], control[2], seed=seed)
        for level in levels:
            parts = []
            for start in range(0, lowres.shape[0], s.batch_size):
                sl = slice(start, min(lowres.shape[0], start + s.batch_size))
                gens = [torch.Generator().manual_seed(seed + noise_ids[i]) for i in range(sl.start, sl.stop)]
                parts.append(sampling.sample(unet, sched, embeds[sl], negative,
                                             s.steps, s.guidance_scale, gens, resolution=unet.config.sample_size,
                                             lowres=lowres[sl], noise_level=level, noising_scheduler=noising).cpu())
                if progress:
                    progress.done("image", sl.stop - sl.start)
            out[level] = torch.cat(parts)
    return out, read


def _measure(images: torch.Tensor, kinds: list[str], views: list[str], prompts: list[str], truth: list,
             truth_hf: list[float], mean_hf, dino, real_dino, lpips: Lpips, readers: dict, truth_readers: dict) -> list[dict]:
    rows = []
    d = metrics.mean_cosine(dino.embed(data.to_pil(images)), real_dino).tolist() if dino else [None] * len(kinds)
    for i, (kind, view) in enumerate(zip(kinds, views)):
        row = {"input": kind, "view": view, "heldout": view.startswith("held-out"), "image": i, "prompt": prompts[i],
               "dino": d[i],
               **{name: float(fn(images[i])) for name, fn in readers.items()}}
        if truth[i] is not None:
            gt = truth[i]
            row.update(psnr=psnr(images[i], gt), ssim=ssim(images[i], gt), hp_corr=hp_correlation(images[i], gt),
                       hf_ratio=hf_ratio(images[i], truth_hf[i]),
                       lpips=lpips.distance(images[i], gt) if lpips.available else None,
                       **{name: float(fn(images[i], gt)) for name, fn in truth_readers.items()})
        else:  # no ground truth: against the real photos' mean energy
            row.update(psnr=None, ssim=None, hp_corr=None, hf_ratio=hf_ratio(images[i], mean_hf), lpips=None)
        rows.append(row)
    return rows


def _control_row(seed: int, model: str, read: dict | None, outputs: dict, levels: list[int], n: int) -> dict:
    """The positive control of one model and seed: condition read and sampling-level effect, verdict."""
    lo, hi = min(levels), max(levels)
    effect = sr_control.level_effect(outputs[lo][:n], outputs[hi][:n]) if hi > lo else None
    r = read["read"] if read else None
    return {"seed": seed, "model": model, "read": r, "shares": read["shares"] if read else None,
            "level_effect": effect, "levels": [lo, hi], "verdict": sr_control.verdict(r, effect)}


def split_holdout(n: int, holdout: int | None, training: bool) -> tuple[list[int], list[int]]:
    """(training photo indices, held-out indices): the last `holdout` photos are held out (default 1
    with >= 4 photos); at least one photo is left to train on."""
    k = (1 if n >= 4 else 0) if holdout is None else holdout
    if not training:
        return list(range(n)), []
    if not 0 <= k < n:
        raise InputError(f"--holdout {k}: must be >= 0 and leave at least one of the {n} subject photos to train on")
    return list(range(n - k)), list(range(n - k, n))


def _dino(req: StudyRequest):
    """(scorer or None, line for the report); a model that cannot be loaded makes the column unavailable."""
    if req.dino == "none":
        return None, "DINO: not computed (--dino none)"
    from cascade.offline.tiny_metrics import resolve_metric_model

    try:
        d = metrics.DinoScorer(resolve_metric_model(req.dino, req.cfg.models.cache_dir, "dino"), str(runner.device()))
    except Exception as e:  # not in the cache and no network, or not a DINO folder
        first = str(e).splitlines()[0][:160] if str(e) else ""
        return None, f"DINO: unavailable: {req.dino} could not be loaded ({e.__class__.__name__}: {first})"
    return d, metrics.describe_models(d, None, "")[0]


def _write_training_photos(photos, idx: list[int], folder: Path) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    for i in idx:
        photos[i].save(folder / f"photo-{i:02d}.png")
    return str(folder)


def run_study(req: StudyRequest) -> tuple[Path, list[dict]]:
    """The sweep; (output folder, one row per seed x SR model x noise level x input image)."""
    cfg = req.cfg
    if not req.class_noun.strip():
        raise InputError("--class-noun must name the subject's class, e.g. dog")
    for name, *_ in req.variants:  # each becomes a folder under the output
        folders.safe_name(name, "--variant")
    paths = models.resolve(cfg)
    base = models.resolve_name(cfg, req.base, "stage2") if req.base else components.describe_source(paths.stage2).base
    components.check_stage(base, 2, f"base SR model ({base})")
    high, low = resolutions.stage2_sizes(base, paths.stage1)  # SR output, SR input = stage I output
    photos = data.load_folder(req.subject, high, "subject", allow_upscale=cfg.stage2.train.allow_upscale)
    photos = photos[:req.max_images]
    train_idx, held_idx = split_holdout(len(photos), req.holdout, bool(req.variants))
    given = [(label, models.resolve_name(cfg, p, "stage2")) for label, p in req.sr]
    for label, p in given:
        components.check_stage(p, 2, f"--sr {label} ({p})")
        if resolutions.check_cascade(paths.stage1, p)[1] != high:  # every SR model takes and makes the same sizes
            raise InputError(f"--sr {label} ({p}) makes {resolutions.stage2_sizes(p, paths.stage1)[0]}px images but "
                             f"the base SR model ({base}) {high}px ones; compare SR models of one cascade")
    s1 = "none" if req.stage1 == "none" or req.num_stage1 == 0 else (
        models.resolve_name(cfg, req.stage1, "stage1") if req.stage1 else paths.stage1)
    if s1 != "none":
        components.check_stage(s1, 1, f"stage I model ({s1})")
    token = _identifier(req, [p for _, p in given], s1, paths.text_encoder)
    seeds = list(req.seeds or [req.seed])
    dino, dino_line = _dino(req)
    lpips = Lpips(req.lpips_net)
    inputs = {"subject": req.subject, "base SR model": base, "stage I model": s1, "text encoder": paths.text_encoder,
              **{f"--sr {label}": p for label, p in given}}
    out = folders.prepare_output(req.output, f"study-sr-{req.class_noun}", overwrite=req.overwrite,
                                 identity={"command": "study-sr"}, protected=inputs)
    folders.start_logging(out, cfg)
    for line in req.settings:
        log.info("study-sr setting: %s", line)
    subject = _write_training_photos(photos, train_idx, out / "training-photos") if held_idx else req.subject

    truth = data.stack(photos, high)
    kinds = ["real"] * len(photos)
    views = ["held-out" if i in held_idx else ("training" if req.variants else "subject photo") for i in train_idx + held_idx]
    truth = truth[train_idx + held_idx]
    if req.fresh_views is not None and len(req.fresh_views):
        truth = torch.cat([truth, req.fresh_views.float()])
        kinds += ["real"] * len(req.fresh_views)
        views += ["held-out (fresh view)"] * len(req.fresh_views)
    gts = list(truth)
    prompt = ident.instance_prompt(token, req.class_noun)
    class_prompt = f"a {req.class_noun}"
    encoder = TextEncoder(paths.text_encoder, cfg.models.cache_dir, cfg.max_text_length, models.weights_dtype(cfg),
                          cfg.models.variant, device=models.text_encoder_device(cfg))
    embeds = encoder.encode([prompt, class_prompt, ""])
    fixed = [data.downsample(truth, low)]
    if req.class_inputs is not None and len(req.class_inputs):
        fixed.append(req.class_inputs.float())
        kinds += ["class"] * len(req.class_inputs)
        views += ["class (other objects)"] * len(req.class_inputs)
        gts += [None] * len(req.class_inputs)
    n_s1 = req.num_stage1 if s1 != "none" else 0
    n_cls = req.class_stage1 if s1 != "none" else 0
    kinds += ["stage1"] * n_s1 + ["class"] * n_cls
    views += ["stage I sample"] * n_s1 + ["class (base stage I 'a <class>')"] * n_cls
    gts += [None] * (n_s1 + n_cls)
    # drift is read under the class prompt; the same other objects again under the instance prompt,
    # labelled apart (the SR told "this is the subject": not class-prompt drift)
    prompts = [class_prompt if k == "class" else prompt for k in kinds]
    again = [i for i, k in enumerate(kinds) if k == "class"]
    noise_ids = list(range(len(kinds))) + again
    kinds += ["class"] * len(again)
    views += [INSTANCE_VIEW + views[i][len("class"):] for i in again]
    gts += [None] * len(again)
    prompts += [prompt] * len(again)
    input_embeds = torch.cat([embeds[p] for p in prompts])
    truth_hf = [hf_energy(x) if x is not None else None for x in gts]  # once, not per model and level
    mean_hf = sum(truth_hf[:len(photos)]) / len(photos)
    real_dino = dino.embed(photos) if dino else None
    n_models = 1 + len(given) + len(req.variants)
    progress = Progress(len(seeds) * len(req.variants), len(seeds) * n_models * len(req.levels) * len(kinds),
                        train_weight=max(1.0, cfg.stage2.train.max_steps * cfg.stage2.train.batch_size
                                         / max(1, cfg.stage2.sample.steps * 2)))
    rows, shown, controls = [], {}, []
    # the positive control reads the subject's photos (and fresh views), at most CONTROL_IMAGES of them
    n_photos = min(CONTROL_IMAGES, len(truth))
    control = (truth[:n_photos], input_embeds[:n_photos], low)
    info_models = {"base": base, **dict(given)}
    for seed in seeds:
        inputs = list(fixed)
        if n_s1:
            inputs.append(runner.run_stage1(s1, cfg, embeds[prompt].expand(n_s1, -1, -1), embeds[""],
                                            [seed * 100_000 + 10_000 + i for i in range(n_s1)]))
        if n_cls:  # the class as the frozen stage I draws it, not the fine-tuned one
            inputs.append(runner.run_stage1(paths.stage1, cfg, embeds[class_prompt].expand(n_cls, -1, -1), embeds[""],
                                            [seed * 100_000 + 20_000 + i for i in range(n_cls)]))
        lowres = torch.cat(inputs)
        lowres = torch.cat([lowres, lowres[again]])
        progress.skip()
        trained = _train_variants(req, base, token, subject, out, seed, progress) if req.variants else []
        folders.start_logging(out, cfg)  # training runs log into their own folders; back to the study's log
        sr_models = [("base", base, {"train_aug": "pretrained", "prior": False})] + \
                    [(label, p, {"train_aug": "given", "prior": False}) for label, p in given] + trained
        info_models.update({label: p for label, p, _ in trained})
        reference = noise_aug.upsample(lowres, high).clamp(-1, 1)  # plain bilinear upsampling, no model
        for r in _measure(reference, kinds, views, prompts, gts, truth_hf, mean_hf, dino, real_dino, lpips, req.readers,
                          req.truth_readers):
            rows.append({"seed": seed, "model": "bilinear upsampling (no model)", "train_aug": "none", "prior": False,
                         "noise_level": None, **r})
        outputs = {}
        for label, path, meta in sr_models:
            log.info("seed %d, SR model %s (%s): %d inputs x noise levels %s", seed, label, path, lowres.shape[0],
                     req.levels)
            outputs[label], read = _upsample_all(path, cfg, lowres, input_embeds, embeds[""], req.levels,
                                                 seed * 100_000, noise_ids, progress, control)
            controls.append(_control_row(seed, label, read, outputs[label], req.levels, n_photos))
            for level in req.levels:
                for r in _measure(outputs[label][level], kinds, views, prompts, gts, truth_hf, mean_hf, dino, real_dino, lpips,
                                  req.readers, req.truth_readers):
                    rows.append({"seed": seed, "model": label, **meta, "noise_level": level, **r})
        if not shown:  # grids of the first seed
            shown = {"lowres": lowres, "outputs": outputs, "reference": reference}
        info = {"subject": req.subject, "class_noun": req.class_noun, "prompt": prompt, "identifier": token,
                "models": info_models, "levels": req.levels, "seeds": seeds[:seeds.index(seed) + 1], "stage1": s1,
                "resolutions": [low, high],
                "training_photos": train_idx, "heldout_photos": held_idx,
                "fresh_views": 0 if req.fresh_views is None else len(req.fresh_views),
                "random_weights": any(model_sources.random_weights(components.describe_source(p).base)
                                      for p in [base, paths.text_encoder] + ([s1] if s1 != "none" else [])),
                "dino": dino_line, "dino_random": bool(dino and dino.random), "lpips": lpips.reason or "lpips package",
                "readers": list(req.readers), "truth_readers": list(req.truth_readers),
                "variants": [list(v) for v in req.variants], "settings": list(req.settings), "controls": controls}
        # after every seed, so a cut-off sweep keeps what it measured
        sr_study_report.write(out, rows, info, shown["lowres"], gts, kinds, views, shown["outputs"], shown["reference"])
    return out, rows
