"""`cascade toy study`: the paper's three claims on the toy cascade, over several seeds, read exactly.

Per seed s (fine-tuning seed; sampling seeds disjoint per seed):
 (a) fidelity: "a [V] toy" stage I samples with the subject's colour+shape, base vs fine-tuned;
 (b) drift: "a toy" samples with the subject's colour+shape and their (colour, shape) entropy, after
     stage I fine-tuning with vs without prior preservation (base for reference);
 (c) SR detail: `cascade study-sr` (cascade.study) with the toy readers: stripes / emblem read after
     upsampling the subject's 16 px views and the fine-tuned stage I's "a [V] toy" samples, by SR
     base and SR fine-tuned at low and at high noise augmentation, sampled at several noise levels;
     its full output (PSNR, SSIM, HF ratio, plots, grids) is in seed*/study-sr.
Writes results.csv (one row per measurement), table.md (mean +- std over seeds) and plots.
"""
from __future__ import annotations

import csv
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from cascade.toy import measure, world


@dataclass
class StudyConfig:
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    samples: int = 16          # stage I samples per prompt and model
    stage1_steps: int = 100    # stage I fine-tuning steps (both variants)
    stage2_steps: int = 100
    low_aug: tuple[int, int] = (0, 1)
    high_aug: tuple[int, int] = (250, 250)
    levels: list[int] = field(default_factory=lambda: [0, 50, 100, 250])
    sr_inputs: int = 8         # stage I samples upsampled per SR model and level (plus the 5 subject views)


def _cfg(overrides: list[str]):
    from cascade.config import load_config

    return load_config("toy", overrides)


def _train(stage: int, overrides: list[str], subject: Path, out: Path, class_dir: Path | None = None) -> str:
    from cascade.training import TrainRequest, train

    r = train(TrainRequest(stage, _cfg(overrides), str(subject), world.CLASS_NOUN, output=str(out),
                           class_dir=str(class_dir) if class_dir else None, overwrite=True))
    return str(r.export_dir)


def _sr_study(sc: StudyConfig, overrides: list[str], subject: Path, token: str, base: str, stage1: str, seed: int,
              out: Path) -> list[dict]:
    """Claim (c) through `cascade study-sr`: means of the readers per input kind, SR model and level."""
    from cascade.evaluation import sr_study, sr_study_report

    req = sr_study.StudyRequest(_cfg(overrides), str(subject), world.CLASS_NOUN, identifier=token, base=base,
                             variants=[("low", *sc.low_aug), ("high", *sc.high_aug)], levels=sc.levels,
                             stage1=stage1, num_stage1=sc.sr_inputs, max_images=len(world.subject_photos()),
                             seed=seed * 10_000, dino="none", output=str(out), overwrite=True,
                             readers=measure.study_readers())
    rows = sr_study.run_study(req)[1]
    return sr_study_report.aggregate(rows, list(req.readers))


def run_study(root: Path, sc: StudyConfig, cache_dir: str, log=print) -> list[dict]:
    from cascade import models

    root.mkdir(parents=True, exist_ok=True)
    subject = measure.write_subject(root / "subject")
    common = [f"models.cache_dir={cache_dir}", "stage1.train.sample_every=100000", "stage2.train.sample_every=100000",
              "stage1.train.checkpoint_every=100000", "stage2.train.checkpoint_every=100000"]
    cfg = _cfg(common)
    paths = models.resolve(cfg)
    rows = []

    def add(seed, claim, model, metric, value, level=""):
        rows.append({"seed": seed, "claim": claim, "model": model, "level": level, "metric": metric, "value": value})
        log(f"seed {seed} {claim} {model} {level} {metric} = {value:.3f}")

    for seed in sc.seeds:
        d = root / f"seed{seed}"
        s1 = [*common, f"stage1.train.seed={seed}", f"stage1.train.max_steps={sc.stage1_steps}"]
        prior = _train(1, s1, subject, d / "stage1-prior", root / "class_images")
        noprior = _train(1, [*s1, "stage1.train.prior_preservation=false"], subject, d / "stage1-noprior")
        token = json.loads((Path(prior) / "cascade.json").read_text())["identifier"]
        inst = f"a {token} toy"
        seeds = list(range(seed * 10_000, seed * 10_000 + sc.samples))
        samples = {}
        for name, path in (("base", paths.stage1), ("prior", prior), ("no-prior", noprior)):
            samples[name] = (measure.sample_prompt(path, cfg, inst, seeds), measure.sample_prompt(path, cfg, "a toy", seeds))
            add(seed, "a fidelity", name, "subject colour+shape", measure.fidelity(samples[name][0]))
            dr = measure.drift(samples[name][1])
            add(seed, "b drift", name, "a toy: subject share", dr["subject_share"])
            add(seed, "b drift", name, "a toy: entropy bits", dr["entropy_bits"])
        s2 = [*common, f"stage2.train.seed={seed}", f"stage2.train.max_steps={sc.stage2_steps}",
              "stage2.train.prior_preservation=false"]
        sources = {"real": "subject views", "stage1": "stage I samples"}
        for a in _sr_study(sc, s2, subject, token, paths.stage2, prior, seed, d / "study-sr"):
            for metric in ("stripes", "emblem"):
                add(seed, f"c SR ({sources[a['input']]})", a["model"], metric, a[metric],
                    "" if a["noise_level"] is None else a["noise_level"])
        _write(root, rows, sc)  # after every seed, so a cut-off run keeps what it measured
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    keys = list(dict.fromkeys((r["claim"], r["model"], r["level"], r["metric"]) for r in rows))
    out = []
    for k in keys:
        vals = [r["value"] for r in rows if (r["claim"], r["model"], r["level"], r["metric"]) == k]
        out.append({"claim": k[0], "model": k[1], "level": k[2], "metric": k[3], "mean": statistics.mean(vals),
                    "std": statistics.pstdev(vals), "n_seeds": len(vals)})
    return out


def _write(root: Path, rows, sc: StudyConfig):
    with open(root / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    summ = summarise(rows)
    lines = ["| claim | model | SR sampling level | metric | mean | std (over seeds) | seeds |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {s['claim']} | {s['model']} | {s['level']} | {s['metric']} | {s['mean']:.3f} | {s['std']:.3f} | "
              f"{s['n_seeds']} |" for s in summ]
    (root / "table.md").write_text("\n".join(lines) + "\n")
    (root / "study.json").write_text(json.dumps({"config": vars(sc), "summary": summ}, indent=2, default=list))
    _plots(root, summ, sc)


def _plots(root: Path, summ, sc: StudyConfig):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, src in zip(axes[:2], ("subject views", "stage I samples")):
        for model in dict.fromkeys(s["model"] for s in summ if s["claim"] == f"c SR ({src})"):
            pts = [s for s in summ if s["claim"] == f"c SR ({src})" and s["model"] == model and s["metric"] == "stripes"
                   and s["level"] != ""]
            if not pts:  # bilinear upsampling has no noise level: a line across
                ref = [s for s in summ if s["claim"] == f"c SR ({src})" and s["model"] == model
                       and s["metric"] == "stripes"][0]
                ax.axhline(ref["mean"], ls="--", c="grey", lw=1, label=model)
                continue
            ax.errorbar([p["level"] for p in pts], [p["mean"] for p in pts], [p["std"] for p in pts], label=model,
                        marker="o", capsize=3)
        ax.set(title=f"stripes recovered: {src}", xlabel="SR sampling noise level", ylabel="fraction", ylim=(-0.05, 1.05))
        ax.legend(fontsize=8)
    bars = [s for s in summ if s["claim"] in ("a fidelity", "b drift") and s["metric"] != "a toy: entropy bits"]
    ax = axes[2]
    ax.bar(range(len(bars)), [b["mean"] for b in bars], yerr=[b["std"] for b in bars], capsize=3)
    ax.set_xticks(range(len(bars)), [f"{b['metric'][:14]}\n{b['model']}" for b in bars], fontsize=7, rotation=30)
    ax.set(title="fidelity and drift (stage I)", ylim=(0, 1.05))
    fig.tight_layout()
    fig.savefig(root / "plots.png", dpi=90)
    plt.close(fig)
