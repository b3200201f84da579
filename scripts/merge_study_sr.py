"""Merge `cascade study-sr` folders (e.g. one seed each, run in parallel) and print the toy world's SR
table: means over seeds, then the paired differences of every SR model against a reference (default
the first variant fine-tuned; per seed A - B, mean and 95% paired t interval):
python scripts/merge_study_sr.py DIR [DIR ...] [--reference MODEL] [--json OUT]."""
import json
import sys
from pathlib import Path

from cascade.evaluation import paired, sr_control
from cascade.evaluation.sr_study_report import control_markdown, merge, paired_rows

# every column a toy study may have (the glyph's since issue 28, the freckles' before); empty ones are left out
COLUMNS = [("held-out", "glyph_drawn", "held-out: glyph drawn"), ("held-out", "glyph_hit", "held-out: glyph placed"),
           ("held-out", "freckle_f1", "held-out: freckle F1"), ("held-out", "hp_corr", "held-out: high-pass corr."),
           ("held-out", "psnr", "held-out: PSNR (dB)"), ("held-out", "ssim", "held-out: SSIM"),
           ("training", "glyph_drawn", "training views: glyph drawn"),
           ("training", "freckle_f1", "training views: freckle F1"),
           ("class", "glyph", "other toys, class prompt: glyph drawn"),
           ("class", "freckles", "other toys, class prompt: freckles drawn"),
           ("class", "emblem", "other toys, class prompt: emblem drawn"),
           ("instance prompt", "glyph", "other toys, instance prompt: glyph drawn"),
           ("instance prompt", "emblem", "other toys, instance prompt: emblem drawn"),
           ("stage I sample", "freckles", "stage I samples: freckles drawn")]


def _option(argv: list[str], name: str):
    if name not in argv:
        return None, argv
    i = argv.index(name)
    return argv[i + 1], argv[:i] + argv[i + 2:]


def main(argv: list[str]) -> int:
    out, argv = _option(argv, "--json")
    reference, argv = _option(argv, "--reference")
    folders = [Path(a) for a in argv]
    seeds, means = merge(folders)
    info = json.loads((folders[0] / "results.json").read_text())
    controls = [c for f in folders for c in json.loads((f / "results.json").read_text()).get("controls", [])]
    verdicts = sr_control.summary(controls)

    def label(model):  # a model that fails the positive control is not evidence of "no effect"
        return f"{model} ({sr_control.CANNOT})" if verdicts.get(model) == sr_control.CANNOT else model
    pairs = paired_rows(seeds, info["readers"], info.get("truth_readers", ()), reference)

    def cell(view, model, level, metric):
        a = next((a for a in means if (a["view"], a["model"], a["noise_level"]) == (view, model, level)), None)
        if a is None or a.get(metric) is None:
            return "-"
        sd = a.get(metric + "_std")
        return f"{a[metric]:.3f}" + (f" ± {sd:.3f}" if sd is not None else "")

    columns = [c for c in COLUMNS if any(a["view"] == c[0] and a.get(c[1]) is not None for a in means)]
    n = sorted({s["seed"] for s in seeds})
    print(f"seeds {n} (mean ± std over seeds)")
    print("| SR model | training aug | sampling level | " + " | ".join(c[2] for c in columns) + " |")
    print("|---|---|---|" + "---|" * len(columns))
    for model in dict.fromkeys(a["model"] for a in means):
        for level in dict.fromkeys(a["noise_level"] for a in means if a["model"] == model):
            aug = next(a["train_aug"] for a in means if a["model"] == model)
            print(f"| {label(model)} | {aug} | {'-' if level is None else level} | "
                  + " | ".join(cell(v, model, level, m) for v, m, _ in columns) + " |")
    print("\npaired differences A - B, same seed and inputs: mean over seeds [95% paired t interval]")
    print("| A - B | sampling level | seeds | " + " | ".join(c[2] for c in columns) + " |")
    print("|---|---|---|" + "---|" * len(columns))
    for a, level in dict.fromkeys((p["a"], p["noise_level"]) for p in pairs):
        sel = {p["view"]: p for p in pairs if (p["a"], p["noise_level"]) == (a, level)}
        any_p = next(iter(sel.values()))
        print(f"| {label(a)} - {label(any_p['b'])} | {level} | {len(any_p['seeds'])} | "
              + " | ".join(paired.cell(sel[v], m) if v in sel else "-" for v, m, _ in columns) + " |")
    print("\n".join(control_markdown(controls)))
    if out:
        Path(out).write_text(json.dumps({"per_seed": seeds, "means": means, "paired": pairs, "controls": controls},
                                        indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
