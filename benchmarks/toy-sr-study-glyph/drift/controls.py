"""The drift re-read's controls (reread.py's OUT): on the other toys (class prompt), per SR model and
level, the share with a glyph drawn at several thresholds of the F score (is the effect an artefact of
DRAWN = 0.45?), the mean F score and the mean F - mirrored-F score (is what the model draws the F, or
any flat patch?), each as the model minus the base SR, paired per seed: mean [95 % paired t interval].
  python benchmarks/toy-sr-study-glyph/drift/controls.py OUT"""
import csv
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from cascade.evaluation.paired import interval

THRESHOLDS = (0.40, 0.45, 0.50, 0.55)
out = Path(sys.argv[1])
cells = defaultdict(list)  # (seed, model, level) -> [(F score, mirrored)]
for s in (0, 1, 2):
    for r in csv.DictReader(open(out / f"seed{s}" / "results.csv")):
        if r["view"] == "class (other objects)" and r["noise_level"]:
            cells[(s, r["model"].split(" (")[0], int(r["noise_level"]))].append(
                (float(r["glyph_score"]), float(r["glyph_mirrored"])))

measures = {**{f"drawn >= {t:.2f}": (lambda t: lambda v: statistics.mean(f >= t for f, _ in v))(t) for t in THRESHOLDS},
            "F score": lambda v: statistics.mean(f for f, _ in v),
            "F - mirrored": lambda v: statistics.mean(f - m for f, m in v)}
models = sorted({m for _, m, _ in cells if m != "base"})
levels = sorted({lv for _, _, lv in cells})
print("| model | level | " + " | ".join(measures) + " |\n|---|---|" + "---|" * len(measures))
for model in ["base", *models]:
    for lv in levels:
        row = []
        for fn in measures.values():
            vals = [fn(cells[(s, model, lv)]) for s in (0, 1, 2)]
            if model == "base":
                row.append(f"{statistics.mean(vals):.3f}")
            else:
                mean, _, half = interval([v - fn(cells[(s, "base", lv)]) for s, v in zip((0, 1, 2), vals)])
                row.append(f"{statistics.mean(vals):.3f} ({mean:+.3f} [{mean - half:+.3f}, {mean + half:+.3f}])")
        print(f"| {model} | {lv} | " + " | ".join(row) + " |")
print("\nbase: mean over 3 seeds x 6 other toys; others: mean, then (model - base, paired per seed, 95 % t interval)")
