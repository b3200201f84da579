"""`cascade study-sr`: what super-resolution fine-tuning and its noise augmentation do.

Sweep: sampling `noise_level` x SR model (the base model, given fine-tuned exports, and with
`--train` variants fine-tuned here at low and high training augmentation). Inputs: the subject's
real photos downsampled to stage I's resolution (ground truth exists: PSNR, SSIM, LPIPS, HF ratio,
DINO) and stage I samples of "a [V] <class>" (no ground truth: HF ratio against the real photos'
mean, DINO). Every model sees the same inputs with the same seeds, so differences are the model's.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cascade import identifier as ident
from cascade import model_sources, models, resolutions, runner
from cascade.evaluation import metrics, sr_study_report
from cascade.runs import folders
from cascade.config import Config
from cascade.evaluation.image_metrics import Lpips, hf_energy, hf_ratio, psnr, ssim
from cascade.text import TextEncoder, load_tokenizer
from stages import components, data, noise_aug, sampling
from stages.errors import InputError

log = logging.getLogger(__name__)


@dataclass
class StudyRequest:
    cfg: Config
    subject: str
    class_noun: str
    identifier: str | None = None
    base: str | None = None  # base SR model; default the base of models.stage2
    sr: list = field(default_factory=list)  # [(label, export path)]
    variants: list = field(default_factory=list)  # [(name, aug_min, aug_max)] to fine-tune (--train)
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


def _train_variants(req: StudyRequest, base: str, token: str, out: Path) -> list[tuple[str, str]]:
    from cascade.config_checks import validate
    from cascade.training import TrainRequest, train

    trained = []
    for name, lo, hi in req.variants:
        cfg = dataclasses.replace(req.cfg)
        cfg.models = dataclasses.replace(req.cfg.models, stage2=base)
        cfg.identifier = dataclasses.replace(req.cfg.identifier, token=token)
        t = dataclasses.replace(req.cfg.stage2.train, noise_aug_min=lo, noise_aug_max=hi)
        cfg.stage2 = dataclasses.replace(req.cfg.stage2, train=t, sample=dataclasses.replace(req.cfg.stage2.sample,
                                                                                              noise_level=-1))
        validate(cfg)
        log.info("training SR variant %s: noise augmentation %d..%d, %d steps", name, lo, hi, t.max_steps)
        result = train(TrainRequest(2, cfg, req.subject, req.class_noun, str(out / "train" / name)))
        trained.append((f"{name} (aug {lo}..{hi})", str(result.export_dir)))
    return trained


@torch.no_grad()
def _upsample_all(path: str, cfg: Config, lowres: torch.Tensor, embeds, negative, levels: list[int],
                  seed: int) -> dict[int, torch.Tensor]:
    """level -> SR outputs for every input; one model resident for the whole sweep; image i always
    uses seed + i, whatever the model or level."""
    s = cfg.stage2.sample
    out = {}
    with runner.resident(path, cfg, ("scheduler", "image_noising_scheduler")) as (unet, sched, noising):
        for level in levels:
            parts = []
            for start in range(0, lowres.shape[0], s.batch_size):
                sl = slice(start, min(lowres.shape[0], start + s.batch_size))
                gens = [torch.Generator().manual_seed(seed + i) for i in range(sl.start, sl.stop)]
                parts.append(sampling.sample(unet, sched, embeds.expand(sl.stop - sl.start, -1, -1), negative,
                                             s.steps, s.guidance_scale, gens, resolution=unet.config.sample_size,
                                             lowres=lowres[sl], noise_level=level, noising_scheduler=noising).cpu())
            out[level] = torch.cat(parts)
    return out


def _measure(images: torch.Tensor, kinds: list[str], truth: torch.Tensor, truth_hf: list[float], dino, real_dino,
             lpips: Lpips, readers: dict) -> list[dict]:
    rows = []
    d = metrics.mean_cosine(dino.embed(data.to_pil(images)), real_dino).tolist() if dino else [None] * len(kinds)
    for i, kind in enumerate(kinds):
        row = {"input": kind, "image": i, "dino": d[i], **{name: float(fn(images[i])) for name, fn in readers.items()}}
        if kind == "real":
            gt = truth[i]
            row.update(psnr=psnr(images[i], gt), ssim=ssim(images[i], gt), hf_ratio=hf_ratio(images[i], truth_hf[i]),
                       lpips=lpips.distance(images[i], gt) if lpips.available else None)
        else:
            # no ground truth: against the real photos' mean energy
            row.update(psnr=None, ssim=None, hf_ratio=hf_ratio(images[i], sum(truth_hf) / len(truth_hf)), lpips=None)
        rows.append(row)
    return rows


def run_study(req: StudyRequest) -> tuple[Path, list[dict]]:
    """The sweep; (output folder, one row per SR model x noise level x input image)."""
    cfg = req.cfg
    if not req.class_noun.strip():
        raise InputError("--class-noun must name the subject's class, e.g. dog")
    for name, _, _ in req.variants:  # each becomes a folder under the output
        folders.safe_name(name, "--variant")
    paths = models.resolve(cfg)
    base = models.resolve_name(cfg, req.base, "stage2") if req.base else components.describe_source(paths.stage2).base
    components.check_stage(base, 2, f"base SR model ({base})")
    high, low = resolutions.stage2_sizes(base, paths.stage1)  # SR output, SR input = stage I output
    photos = data.load_folder(req.subject, high, "subject", allow_upscale=cfg.stage2.train.allow_upscale)
    photos = photos[:req.max_images]
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
    dino = None
    if req.dino != "none":
        from cascade.offline.tiny_metrics import resolve_metric_model

        dino = metrics.DinoScorer(resolve_metric_model(req.dino, cfg.models.cache_dir, "dino"), str(runner.device()))
    lpips = Lpips(req.lpips_net)
    inputs = {"subject": req.subject, "base SR model": base, "stage I model": s1, "text encoder": paths.text_encoder,
              **{f"--sr {label}": p for label, p in given}}
    out = folders.prepare_output(req.output, f"study-sr-{req.class_noun}", overwrite=req.overwrite,
                                 identity={"command": "study-sr"}, protected=inputs)
    folders.start_logging(out, cfg)
    trained = _train_variants(req, base, token, out) if req.variants else []
    folders.start_logging(out, cfg)  # training runs log into their own folders; back to the study's log
    sr_models = [("base", base)] + given + trained

    truth = data.stack(photos, high)
    prompt = ident.instance_prompt(token, req.class_noun)
    encoder = TextEncoder(paths.text_encoder, cfg.models.cache_dir, cfg.max_text_length, models.weights_dtype(cfg),
                          cfg.models.variant, device=models.text_encoder_device(cfg))
    embeds = encoder.encode([prompt, ""])
    inputs, kinds = [data.downsample(truth, low)], ["real"] * truth.shape[0]
    if s1 != "none":
        seeds = [req.seed + 10_000 + i for i in range(req.num_stage1)]
        inputs.append(runner.run_stage1(s1, cfg, embeds[prompt].expand(len(seeds), -1, -1), embeds[""], seeds))
        kinds += ["stage1"] * len(seeds)
    lowres = torch.cat(inputs)
    truth_hf = [hf_energy(x) for x in truth]  # once, not per model and level
    real_dino = dino.embed(photos) if dino else None

    rows, outputs = [], {}
    reference = noise_aug.upsample(lowres, high).clamp(-1, 1)  # plain bilinear upsampling, no model
    for r in _measure(reference, kinds, truth, truth_hf, dino, real_dino, lpips, req.readers):
        rows.append({"model": "bilinear upsampling (no model)", "noise_level": None, **r})
    for label, path in sr_models:
        log.info("SR model %s (%s): %d inputs x noise levels %s", label, path, lowres.shape[0], req.levels)
        outputs[label] = _upsample_all(path, cfg, lowres, embeds[prompt], embeds[""], req.levels, req.seed)
        for level in req.levels:
            for r in _measure(outputs[label][level], kinds, truth, truth_hf, dino, real_dino, lpips, req.readers):
                rows.append({"model": label, "noise_level": level, **r})
    info = {"subject": req.subject, "class_noun": req.class_noun, "prompt": prompt, "identifier": token,
            "models": dict(sr_models), "levels": req.levels, "stage1": s1, "resolutions": [low, high],
            "random_weights": any(model_sources.random_weights(components.describe_source(p).base)
                                  for p in [base, paths.text_encoder] + ([s1] if s1 != "none" else [])),
            "dino": metrics.describe_models(dino, None, lpips.reason)[0] if dino else "DINO: not computed (--dino none)",
            "dino_random": bool(dino and dino.random), "lpips": lpips.reason or "lpips package",
            "readers": list(req.readers)}
    sr_study_report.write(out, rows, info, lowres, truth, kinds, outputs, reference)
    return out, rows
