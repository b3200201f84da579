"""Paired statistics for the SR study: variants share seeds (the same fine-tuning batches, the same
sampling noise, the same inputs), so the difference between two models is judged per seed, not
against the spread over seeds, which the seed itself dominates (issue 28: PSNR's seed std is 1.8 dB
where aug100 - aug0 at level 250 is +0.050, +0.028, +0.051 dB). Intervals use Student's t quantile
for the number of seeds (scipy.stats.t), never a normal approximation."""
from __future__ import annotations

import math
import statistics

from scipy.stats import t as student_t

TRAINED = ("pretrained", "given", "none")  # train_aug of models that were not fine-tuned here


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with `df` degrees of freedom (the 95% two-sided interval)."""
    return float(student_t.ppf(0.975, df))


def interval(values: list[float]) -> tuple[float, float | None, float | None]:
    """(mean, sample std, half-width of the 95% t interval of the mean); std and half-width are None
    for fewer than 2 values."""
    m = statistics.fmean(values)
    if len(values) < 2:
        return m, None, None
    sd = statistics.stdev(values)
    return m, sd, t975(len(values) - 1) * sd / math.sqrt(len(values))


def reference_model(per_seed: list[dict]) -> str | None:
    """The model every other is compared with: the first variant fine-tuned here (the study's lowest
    augmentation when the variants are listed low to high), else the base model."""
    sampled = [s for s in per_seed if s["noise_level"] is not None]
    first = next((s["model"] for s in sampled if s["train_aug"] not in TRAINED), None)
    return first or next((s["model"] for s in sampled), None)


def differences(per_seed: list[dict], metrics_of, reference: str | None = None) -> list[dict]:
    """Per view section and sampling level, every other SR model A against the reference B: per metric
    the per-seed differences A - B (seeds both have), their mean and 95% paired t interval.
    `metrics_of(input kind)` names the metrics of a section. Bilinear upsampling (no level) is left out."""
    ref = reference or reference_model(per_seed)
    by = {(s["view"], s["model"], s["noise_level"], s["seed"]): s for s in per_seed}
    keys = list(dict.fromkeys((s["view"], s["noise_level"], s["model"]) for s in per_seed
                              if s["noise_level"] is not None and s["model"] != ref))
    out = []
    for view, level, model in keys:
        seeds = [s for (v, m, lv, s) in by if (v, m, lv) == (view, model, level) and (view, ref, level, s) in by]
        if not seeds:
            continue
        kind = by[(view, model, level, seeds[0])]["input"]
        row = {"view": view, "input": kind, "noise_level": level, "a": model, "b": ref, "seeds": sorted(seeds)}
        for m in metrics_of(kind):
            d = [by[(view, model, level, s)][m] - by[(view, ref, level, s)][m] for s in sorted(seeds)
                 if by[(view, model, level, s)].get(m) is not None and by[(view, ref, level, s)].get(m) is not None]
            mean, sd, half = interval(d) if d else (None, None, None)
            row.update({m + "_diffs": d, m: mean, m + "_std": sd, m + "_ci95": half})
        out.append(row)
    return out


def cell(row: dict, metric: str) -> str:
    """'mean [lo, hi]' (one seed: the difference alone)."""
    v, half = row.get(metric), row.get(metric + "_ci95")
    if v is None:
        return "-"
    return f"{v:+.3f}" if half is None else f"{v:+.3f} [{v - half:+.3f}, {v + half:+.3f}]"
