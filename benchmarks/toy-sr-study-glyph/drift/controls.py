"""Controls for the drift column (reread.py's OUT, or any study folder of the glyph grid): on the other toys,
per SR model and level, (1) the share drawn striped (the `stripes` reader) and the glyph-patch share among
those alone (the patch reader needs stripes: a model that draws no stripes cannot score); (2) where the
run has reread.py's extra readers, the patch share at several thresholds of the F score (is the effect an
artefact of DRAWN = 0.45?) and the mean F - mirrored-F score (is the patch the F, or any flat patch?).
Shares are over 3 seeds x 6 toys; "vs base" is the model minus the base SR, paired per seed: mean [95 % t].
  python benchmarks/toy-sr-study-glyph/drift/controls.py OUT [VIEW]   (VIEW: class (default) | instance)"""
import csv
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from cascade.evaluation.paired import interval

THRESHOLDS = (0.40, 0.45, 0.50, 0.55)
out, which = Path(sys.argv[1]), (sys.argv[2] if len(sys.argv) > 2 else "class")
view = {"class": "class (other objects)", "instance": "instance prompt (other objects)"}[which]
rows = defaultdict(list)  # (seed, model, level) -> result rows
for s in (0, 1, 2):
    for r in csv.DictReader(open(out / f"seed{s}" / "results.csv")):
        if r["view"] == view and r["noise_level"]:
            rows[(s, r["model"].split(" (")[0], int(r["noise_level"]))].append(r)
scores = "glyph_score" in next(iter(rows.values()))[0]


def share(rs, key, at=0.5):
    return statistics.mean(float(r[key]) >= at for r in rs) if rs else float("nan")


measures = {"drawn striped": lambda rs: share(rs, "stripes"), "patch": lambda rs: share(rs, "glyph")}
if scores:
    measures.update({f"F score >= {t:.2f}": (lambda t: lambda rs: share(rs, "glyph_score", t))(t) for t in THRESHOLDS})
    measures["F - mirrored"] = lambda rs: statistics.mean(float(r["glyph_score"]) - float(r["glyph_mirrored"]) for r in rs)
models = ["base", *sorted({m for _, m, _ in rows if m != "base"})]
levels = sorted({lv for _, _, lv in rows})
print(f"other toys, {which} prompt\n\n| model | level | " + " | ".join(measures) + " | patch among striped (n) |")
print("|---|---|" + "---|" * (len(measures) + 1))
for model in models:
    for lv in levels:
        cells = []
        for fn in measures.values():
            vals = [fn(rows[(s, model, lv)]) for s in (0, 1, 2)]
            if model == "base":
                cells.append(f"{statistics.mean(vals):.3f}")
            else:
                mean, _, half = interval([v - fn(rows[(s, "base", lv)]) for s, v in zip((0, 1, 2), vals)])
                cells.append(f"{statistics.mean(vals):.3f} ({mean:+.3f} [{mean - half:+.3f}, {mean + half:+.3f}])")
        striped = [r for s in (0, 1, 2) for r in rows[(s, model, lv)] if float(r["stripes"]) >= 0.5]
        cells.append(f"{share(striped, 'glyph'):.2f} ({len(striped)})")
        print(f"| {model} | {lv} | " + " | ".join(cells) + " |")
print("\nbase: mean; others: mean (model - base, paired per seed, 95 % t interval); the last column pools seeds")
