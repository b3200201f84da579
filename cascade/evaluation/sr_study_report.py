"""Outputs of `cascade study-sr`: results.csv (one row per model x level x input image),
table.md (means per model and level, with what the sweep found), results.json, plots of each
metric against the noise level (one line per SR model), and image grids (rows: models; columns:
the low-res input, each noise level, the ground truth)."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import torch

from stages import data

METRICS = {"real": ("psnr", "ssim", "lpips", "hf_ratio", "dino"), "stage1": ("hf_ratio", "dino")}
NAMES = {"psnr": "PSNR (dB)", "ssim": "SSIM", "lpips": "LPIPS", "hf_ratio": "HF ratio", "dino": "DINO"}
TILE = 128


def _mean(values):
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isinf(v))]
    return sum(values) / len(values) if values else None


def metrics_of(kind: str, readers=()) -> tuple:
    return METRICS[kind] + tuple(readers)


def aggregate(rows: list[dict], readers=()) -> list[dict]:
    """Means per (input kind, model, noise level), in the order rows first appear."""
    keys = list(dict.fromkeys((r["input"], r["model"], r["noise_level"]) for r in rows))
    out = []
    for kind, model, level in keys:
        sel = [r for r in rows if (r["input"], r["model"], r["noise_level"]) == (kind, model, level)]
        out.append({"input": kind, "model": model, "noise_level": level, "n": len(sel),
                    **{m: _mean([r.get(m) for r in sel]) for m in metrics_of(kind, readers)}})
    return out


def findings(agg: list[dict]) -> list[str]:
    """Per SR model: the noise level with the best PSNR on real inputs, and its HF ratio."""
    lines = []
    for model in dict.fromkeys(a["model"] for a in agg if a["input"] == "real" and a["noise_level"] is not None):
        sel = [a for a in agg if a["input"] == "real" and a["model"] == model and a["psnr"] is not None]
        if not sel:
            continue
        best = max(sel, key=lambda a: a["psnr"])
        worst = min(sel, key=lambda a: a["psnr"])
        lines.append(f"{model}: best PSNR {best['psnr']:.2f} dB at noise_level {best['noise_level']} "
                     f"(HF ratio {best['hf_ratio']:.2f}); worst {worst['psnr']:.2f} dB at {worst['noise_level']}")
    return lines


def _fmt(v) -> str:
    return "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))


def markdown(agg: list[dict], info: dict, found: list[str]) -> str:
    lines = ["# Super-resolution study", "",
             f"- subject: {info['subject']} (prompt '{info['prompt']}'), SR {info['resolutions'][0]} -> "
             f"{info['resolutions'][1]} px", f"- {info['dino']}", f"- LPIPS: {info['lpips']}"]
    if info["random_weights"]:
        lines.append("- **The cascade weights are tiny and random: every number below describes noise.**")
    if info["dino_random"]:
        lines.append("- The DINO model is random: its similarities mean nothing.")
    for kind, title in (("real", "Real photos downsampled to the SR input size (ground truth exists)"),
                        ("stage1", "Stage I samples (no ground truth; HF ratio vs the real photos' mean)")):
        sel = [a for a in agg if a["input"] == kind]
        if not sel:
            continue
        ms = metrics_of(kind, info["readers"])
        lines += ["", f"## {title}", "", "| model | noise_level | n | " + " | ".join(NAMES.get(m, m) for m in ms) + " |",
                  "|---|---|---|" + "---|" * len(ms)]
        for a in sel:
            lines.append(f"| {a['model']} | {_fmt(a['noise_level'])} | {a['n']} | "
                         + " | ".join(_fmt(a[m]) if not (m == "lpips" and a[m] is None) else "unavailable"
                                      for m in ms) + " |")
    lines += ["", "## What the sweep found", ""] + [f"- {f}" for f in found]
    lines += ["", "HF ratio: high-frequency spectrum energy (above 0.25 x Nyquist) of the output over the "
              "reference's; below 1 = blurred, near 1 with low PSNR = detail that is not the subject's."]
    return "\n".join(lines) + "\n"


def plot(agg: list[dict], kind: str, path: Path, readers=()):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ms = [m for m in metrics_of(kind, readers) if any(a.get(m) is not None for a in agg if a["input"] == kind)]
    fig, axes = plt.subplots(1, len(ms), figsize=(3.6 * len(ms), 3.2), squeeze=False)
    for ax, m in zip(axes[0], ms):
        for model in dict.fromkeys(a["model"] for a in agg if a["input"] == kind):
            sel = [a for a in agg if a["input"] == kind and a["model"] == model and a[m] is not None]
            if sel and sel[0]["noise_level"] is None:
                ax.axhline(sel[0][m], ls="--", c="grey", lw=1, label=model)
            elif sel:
                ax.plot([a["noise_level"] for a in sel], [a[m] for a in sel], marker="o", label=model)
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xlabel("sampling noise_level")
        ax.set_title(NAMES.get(m, m))
    axes[0][0].legend(fontsize=7)
    fig.suptitle("SR study: " + ("real photos (vs ground truth)" if kind == "real" else "stage I samples"))
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


def write(out: Path, rows: list[dict], info: dict, lowres, truth, kinds, outputs, reference):
    agg = aggregate(rows, info["readers"])
    found = findings(agg)
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["input", "image", "model", "noise_level", "psnr", "ssim", "lpips",
                                          "hf_ratio", "dino", *info["readers"]])
        w.writeheader()
        w.writerows(rows)
    (out / "results.json").write_text(json.dumps({**info, "means": agg, "findings": found}, indent=1))
    (out / "table.md").write_text(markdown(agg, info, found))
    for kind in ("real", "stage1"):
        if kind in kinds:
            plot(agg, kind, out / f"plot-{kind}.png", info["readers"])
            i = kinds.index(kind)
            image_grid(i, lowres, truth[i] if kind == "real" else None, outputs, reference, info["levels"],
                       out / f"grid-{kind}.png")
