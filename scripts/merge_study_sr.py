"""Merge `cascade study-sr` folders (e.g. one seed each, run in parallel) and print the means over
seeds of the toy world's SR table: python scripts/merge_study_sr.py DIR [DIR ...] [--json OUT]."""
import json
import sys
from pathlib import Path

from cascade.evaluation.sr_study_report import merge

COLUMNS = [("held-out", "freckle_f1", "held-out: freckle F1"), ("held-out", "hp_corr", "held-out: high-pass corr."),
           ("held-out", "psnr", "held-out: PSNR (dB)"), ("held-out", "ssim", "held-out: SSIM"),
           ("training", "freckle_f1", "training views: freckle F1"),
           ("class", "freckles", "other toys, class prompt: freckles drawn"),
           ("class", "emblem", "other toys, class prompt: emblem drawn"),
           ("instance prompt", "emblem", "other toys, instance prompt: emblem drawn"),
           ("stage I sample", "freckles", "stage I samples: freckles drawn")]


def main(argv: list[str]) -> int:
    out = None
    if "--json" in argv:
        i = argv.index("--json")
        out, argv = argv[i + 1], argv[:i] + argv[i + 2:]
    seeds, means = merge([Path(a) for a in argv])

    def cell(view, model, level, metric):
        a = next((a for a in means if (a["view"], a["model"], a["noise_level"]) == (view, model, level)), None)
        if a is None or a.get(metric) is None:
            return "-"
        sd = a.get(metric + "_std")
        return f"{a[metric]:.3f}" + (f" ± {sd:.3f}" if sd is not None else "")

    n = sorted({s["seed"] for s in seeds})
    print(f"seeds {n} (mean ± std over seeds)")
    print("| SR model | training aug | sampling level | " + " | ".join(c[2] for c in COLUMNS) + " |")
    print("|---|---|---|" + "---|" * len(COLUMNS))
    for model in dict.fromkeys(a["model"] for a in means):
        for level in dict.fromkeys(a["noise_level"] for a in means if a["model"] == model):
            aug = next(a["train_aug"] for a in means if a["model"] == model)
            print(f"| {model} | {aug} | {'-' if level is None else level} | "
                  + " | ".join(cell(v, model, level, m) for v, m, _ in COLUMNS) + " |")
    if out:
        Path(out).write_text(json.dumps({"per_seed": seeds, "means": means}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
