"""Outputs of `cascade study-sr`: results.csv (one row per seed x model x level x input image, with the
training augmentation of the model and a held-out flag), results.json (per-seed means and the means
over seeds with their spread), table.md (one section per kind of view: held-out, training, stage I
samples, other objects), plots of each metric against the noise level (one line per SR model, error
bars = std over seeds), and image grids (rows: models; columns: the low-res input, each noise level,
the ground truth beside every row)."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import torch

from cascade.evaluation import paired, sr_control
from stages import data

METRICS = {"real": ("psnr", "ssim", "hp_corr", "lpips", "hf_ratio", "dino"), "stage1": ("hf_ratio", "dino"),
           "class": ("hf_ratio", "dino")}
NAMES = {"psnr": "PSNR (dB)", "ssim": "SSIM", "hp_corr": "high-pass corr.", "lpips": "LPIPS", "hf_ratio": "HF ratio",
         "dino": "DINO", "freckle_f1": "freckle F1", "freckles": "freckles drawn",
         "glyph_hit": "glyph placed", "glyph_drawn": "glyph drawn", "glyph": "glyph drawn anywhere"}
TILE = 128
INSTANCE_VIEW = "instance prompt"  # views of other objects upsampled under "a [V] <class>"
SECTIONS = (("held-out", "Held-out views: subject photos never trained on, and fresh views (ground truth exists)"),
            ("training", "Training views: the photos the variants fine-tuned on (reconstruction, not generalisation)"),
            ("subject photo", "Subject photos (training use of the given models unknown)"),
            ("stage I sample", "Stage I samples of 'a [V] <class>' (no ground truth; HF ratio vs the photos' mean)"),
            ("class", "Other objects, upsampled with the class prompt 'a <class>' (drift: the subject's detail "
                      "where there is no subject)"),
            (INSTANCE_VIEW, "The same other objects, upsampled with the instance prompt 'a [V] <class>' (what the "
                            "SR draws when told the input is the subject; not class-prompt drift)"))


def _mean(values):
    values = [v for v in values if v is not None and not (isinstance(v, float) and (math.isinf(v) or math.isnan(v)))]
    return sum(values) / len(values) if values else None


def section(view: str) -> str:
    return next(s for s, _ in SECTIONS if view.startswith(s))


def metrics_of(kind: str, readers=(), truth_readers=()) -> tuple:
    return METRICS[kind] + (tuple(truth_readers) if kind == "real" else ()) + tuple(readers)


def _key(r):
    return section(r["view"]), r["model"], r["noise_level"]


def per_seed(rows: list[dict], readers=(), truth_readers=()) -> list[dict]:
    """Means over images per (seed, view section, model, noise level)."""
    keys = list(dict.fromkeys((r["seed"], *_key(r)) for r in rows))
    out = []
    for seed, sec, model, level in keys:
        sel = [r for r in rows if r["seed"] == seed and _key(r) == (sec, model, level)]
        ms = metrics_of(sel[0]["input"], readers, truth_readers)
        out.append({"seed": seed, "view": sec, "heldout": sec == "held-out", "input": sel[0]["input"], "model": model,
                    "train_aug": sel[0]["train_aug"], "prior": sel[0]["prior"], "noise_level": level, "n": len(sel),
                    **{m: _mean([r.get(m) for r in sel]) for m in ms}})
    return out


def aggregate(rows: list[dict], readers=(), truth_readers=()) -> list[dict]:
    """Means over seeds of the per-seed means, with the std over seeds and a 95% t interval."""
    return over_seeds(per_seed(rows, readers, truth_readers), readers, truth_readers)


def merge(folders: list[Path]) -> tuple[list[dict], list[dict]]:
    """(per-seed means, means over seeds) of several study folders' results.json, e.g. one sweep per
    seed run in parallel; a seed measured twice is refused."""
    seeds, readers, truth_readers = [], (), ()
    for f in folders:
        j = json.loads((Path(f) / "results.json").read_text())
        seeds += j["per_seed"]
        readers, truth_readers = j["readers"], j.get("truth_readers", ())
    keys = [(s["seed"], s["view"], s["model"], s["noise_level"]) for s in seeds]
    if len(set(keys)) != len(keys):
        raise ValueError("the same seed, view, model and level appear in two of the folders")
    return seeds, over_seeds(seeds, readers, truth_readers)


def over_seeds(seeds: list[dict], readers=(), truth_readers=()) -> list[dict]:
    keys = list(dict.fromkeys((s["view"], s["model"], s["noise_level"]) for s in seeds))
    out = []
    for key in keys:
        sel = [s for s in seeds if (s["view"], s["model"], s["noise_level"]) == key]
        a = {k: sel[0][k] for k in ("view", "heldout", "input", "model", "train_aug", "prior", "noise_level")}
        a.update(n_seeds=len(sel), n=sel[0]["n"])
        for m in metrics_of(sel[0]["input"], readers, truth_readers):
            vals = [s[m] for s in sel if s[m] is not None]
            a[m] = _mean(vals)
            _, a[m + "_std"], a[m + "_ci95"] = paired.interval(vals) if vals else (None, None, None)
        out.append(a)
    return out


def findings(agg: list[dict]) -> list[str]:
    """Per SR model on held-out views (else all views with truth): the level with the best PSNR."""
    lines = []
    sec = "held-out" if any(a["view"] == "held-out" for a in agg) else None
    sel_all = [a for a in agg if a["input"] == "real" and a["noise_level"] is not None and (sec is None or a["view"] == sec)]
    for model in dict.fromkeys(a["model"] for a in sel_all):
        sel = [a for a in sel_all if a["model"] == model and a["psnr"] is not None]
        if not sel:
            continue
        best, worst = max(sel, key=lambda a: a["psnr"]), min(sel, key=lambda a: a["psnr"])
        lines.append(f"{model} ({sel[0]['view']} views): best PSNR {best['psnr']:.2f} dB at noise_level "
                     f"{best['noise_level']} (HF ratio {best['hf_ratio']:.2f}, high-pass corr. {best['hp_corr']:.3f}); "
                     f"worst {worst['psnr']:.2f} dB at {worst['noise_level']}")
    return lines


def _fmt(v, sd=None) -> str:
    if v is None:
        return "-"
    s = f"{v:.3f}" if isinstance(v, float) else str(v)
    return s + (f" ± {sd:.3f}" if sd is not None else "")


def paired_rows(seeds: list[dict], readers=(), truth_readers=(), reference: str | None = None) -> list[dict]:
    """Per-seed differences of every SR model against the reference model (paired.differences)."""
    return paired.differences(seeds, lambda kind: metrics_of(kind, readers, truth_readers), reference)


def paired_markdown(pairs: list[dict], info: dict) -> list[str]:
    """One table per view section: 'A - B', the level, the seeds, then per metric the mean difference
    over seeds and its 95% paired t interval."""
    lines, verdicts = [], sr_control.summary(info.get("controls", []))
    for sec, title in SECTIONS:
        sel = [p for p in pairs if p["view"] == sec]
        if not sel:
            continue
        ms = [m for m in metrics_of(sel[0]["input"], info["readers"], info.get("truth_readers", ()))
              if any(p.get(m) is not None for p in sel)]
        lines += ["", f"### Paired: {sec} views", "",
                  "| A - B | noise_level | seeds | " + " | ".join(NAMES.get(m, m) for m in ms) + " |",
                  "|---|---|---|" + "---|" * len(ms)]
        lines += [f"| {_label(p['a'], verdicts)} - {_label(p['b'], verdicts)} | {p['noise_level']} | {len(p['seeds'])} | "
                  + " | ".join(paired.cell(p, m) for m in ms) + " |" for p in sel]
    if lines:
        lines = ["", "## Paired differences (same seed, same inputs, same sampling noise)", "",
                 "Per seed A - B, then the mean over seeds [95% paired t interval, Student t with seeds - 1 "
                 "degrees of freedom]; an interval that excludes 0 is a difference the seeds agree on."] + lines
    return lines


def control_markdown(controls: list[dict]) -> list[str]:
    """The positive control per SR model and seed (sr_control): can the model show a noise effect?"""
    if not controls:
        return []
    lines = ["", "## Positive control: can each SR model show a noise effect?", "",
             f"Condition read: faint marks (one low-res pixel {sr_control.MARK:+.1f}) added to the level-0 condition of "
             "the subject's photos; the share of the condition's change at the marks that reaches the model's x0 "
             f"estimate (1 = copies it, 0 = blind to it; bar {sr_control.READ_BAR}), largest over t = "
             f"{', '.join(map(str, sr_control.TIMESTEPS))}. Level effect: 1 - high-pass correlation of the same "
             f"photos upsampled at the lowest and highest sampling level (bar {sr_control.LEVEL_BAR}). A model "
             f"below both bars is labelled '{sr_control.CANNOT}' in every table: its rows cannot show the "
             "effect, so they are not evidence of no effect.", "",
             "| model | seed | condition read (t: share) | level effect (levels) | verdict |", "|---|---|---|---|---|"]
    for c in controls:
        shares = ", ".join(f"{t}: {v:+.3f}" for t, v in (c["shares"] or {}).items()) or "-"
        eff = "-" if c["level_effect"] is None else f"{c['level_effect']:.3f} ({c['levels'][0]} vs {c['levels'][1]})"
        lines.append(f"| {c['model']} | {c['seed']} | {shares} | {eff} | {c['verdict']} |")
    return lines


def _label(model: str, verdicts: dict) -> str:
    return f"{model} ({sr_control.CANNOT})" if verdicts.get(model) == sr_control.CANNOT else model


def markdown(agg: list[dict], info: dict, found: list[str], pairs: list[dict] = ()) -> str:
    lines = ["# Super-resolution study", "",
             f"- subject: {info['subject']} (prompt '{info['prompt']}'), SR {info['resolutions'][0]} -> "
             f"{info['resolutions'][1]} px; seeds {info['seeds']} (values: mean ± std over seeds)",
             f"- training photos {info['training_photos']}, held-out photos {info['heldout_photos']}, "
             f"fresh held-out views {info['fresh_views']}", f"- {info['dino']}", f"- LPIPS: {info['lpips']}"]
    lines += [f"- {s}" for s in info.get("settings", ())]
    if info["random_weights"]:
        lines.append("- **The cascade weights are tiny and random: every number below describes noise.**")
    if info["dino_random"]:
        lines.append("- The DINO model is random: its similarities mean nothing.")
    verdicts = sr_control.summary(info.get("controls", []))
    for sec, title in SECTIONS:
        sel = [a for a in agg if a["view"] == sec]
        if not sel:
            continue
        ms = metrics_of(sel[0]["input"], info["readers"], info.get("truth_readers", ()))
        lines += ["", f"## {title}", "", "| model | training aug | noise_level | images | "
                  + " | ".join(NAMES.get(m, m) for m in ms) + " |", "|---|---|---|---|" + "---|" * len(ms)]
        for a in sel:
            cells = [("unavailable" if m in ("lpips", "dino") and a[m] is None else _fmt(a[m], a[m + "_std"]))
                     for m in ms]
            lines.append(f"| {_label(a['model'], verdicts)} | {a['train_aug']} | {_fmt(a['noise_level'])} | {a['n']} | "
                         + " | ".join(cells) + " |")
    lines += control_markdown(info.get("controls", []))
    lines += paired_markdown(list(pairs), info)
    lines += ["", "## What the sweep found", ""] + [f"- {f}" for f in found]
    lines += ["", "HF ratio: high-frequency spectrum energy (above 0.25 x Nyquist) of the output over the "
              "reference's; below 1 = blurred, near 1 with low PSNR = detail that is not the subject's. "
              "High-pass corr.: correlation of output and truth after removing a sigma-1 px blur (placement). "
              "SSIM: Gaussian window, sigma 1.5."]
    return "\n".join(lines) + "\n"


def plot(agg: list[dict], sec: str, path: Path, readers=(), truth_readers=()):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sel_all = [a for a in agg if a["view"] == sec]
    ms = [m for m in metrics_of(sel_all[0]["input"], readers, truth_readers) if any(a.get(m) is not None for a in sel_all)]
    fig, axes = plt.subplots(1, len(ms), figsize=(3.6 * len(ms), 3.2), squeeze=False)
    for ax, m in zip(axes[0], ms):
        for model in dict.fromkeys(a["model"] for a in sel_all):
            sel = [a for a in sel_all if a["model"] == model and a[m] is not None]
            if sel and sel[0]["noise_level"] is None:
                ax.axhline(sel[0][m], ls="--", c="grey", lw=1, label=model)
            elif sel:
                ax.errorbar([a["noise_level"] for a in sel], [a[m] for a in sel], [a[m + "_std"] or 0 for a in sel],
                            marker="o", capsize=3, label=model)
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xlabel("sampling noise_level")
        ax.set_title(NAMES.get(m, m))
    axes[0][0].legend(fontsize=6)
    fig.suptitle(f"SR study: {sec} views (one line per SR model / training augmentation; bars: std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _tile(x: torch.Tensor, mode: str = "bicubic"):
    from PIL import Image

    return data.to_pil(x.unsqueeze(0))[0].resize((TILE, TILE), Image.NEAREST if mode == "nearest" else Image.BICUBIC)


def image_grid(index: int, lowres, truth, outputs: dict, reference, levels: list[int], path: Path):
    """Rows: bilinear + each SR model; columns: low-res input, each level, ground truth (if any)."""
    from PIL import Image, ImageDraw

    heads = ["input"] + [f"level {v}" for v in levels] + (["ground truth"] if truth is not None else [])
    rows = [("bilinear", [reference[index]] * len(levels))] + \
           [(label, [outs[v][index] for v in levels]) for label, outs in outputs.items()]
    margin_x, margin_y = 150, 18
    canvas = Image.new("RGB", (margin_x + TILE * len(heads), margin_y + TILE * len(rows)), "white")
    draw = ImageDraw.Draw(canvas)
    for c, h in enumerate(heads):
        draw.text((margin_x + c * TILE + 4, 3), h, fill="black")
    for r, (label, images) in enumerate(rows):
        y = margin_y + r * TILE
        draw.text((4, y + TILE // 2), label[:24], fill="black")
        canvas.paste(_tile(lowres[index], "nearest"), (margin_x, y))
        for c, im in enumerate(images):
            canvas.paste(_tile(im), (margin_x + (c + 1) * TILE, y))
        if truth is not None:
            canvas.paste(_tile(truth), (margin_x + (len(levels) + 1) * TILE, y))
    canvas.save(path)


def _atomic_text(path: Path, text: str):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write(out: Path, rows: list[dict], info: dict, lowres, truth: list, kinds, views, outputs, reference):
    rd, trd = info["readers"], info.get("truth_readers", [])
    agg = aggregate(rows, rd, trd)
    found = findings(agg)
    fields = ["seed", "input", "view", "heldout", "image", "prompt", "model", "train_aug", "prior", "noise_level", "psnr", "ssim",
              "hp_corr", "lpips", "hf_ratio", "dino", *trd, *rd]
    tmp = out / "results.csv.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    tmp.replace(out / "results.csv")
    seeds = per_seed(rows, rd, trd)
    pairs = paired_rows(seeds, rd, trd)
    _atomic_text(out / "results.json", json.dumps({**info, "per_seed": seeds, "means": agg, "paired": pairs,
                                                   "findings": found}, indent=1))
    _atomic_text(out / "table.md", markdown(agg, info, found, pairs))
    for kind, sec in (("real", "held-out" if "held-out" in map(section, views) else None), ("stage1", "stage I sample"),
                      ("class", "class")):
        if kind not in kinds:
            continue
        idx = [i for i, (k, v) in enumerate(zip(kinds, views)) if k == kind and (sec is None or section(v) == sec)]
        plot(agg, sec or section(views[idx[0]]), out / f"plot-{kind}.png", rd, trd)
        image_grid(idx[0], lowres, truth[idx[0]], outputs, reference, info["levels"], out / f"grid-{kind}.png")
