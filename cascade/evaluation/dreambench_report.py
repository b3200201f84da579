"""Tables, JSON and the plot of `cascade evaluate`, over every subject scored into a run folder,
with the DreamBooth paper's Table 1 and Table 3 rows beside ours, marked as quoted."""
from __future__ import annotations

import csv
import json
from pathlib import Path

METRICS = ("dino", "clip_i", "clip_t", "pres", "div")
HEADERS = {"dino": "DINO", "clip_i": "CLIP-I", "clip_t": "CLIP-T", "pres": "PRES", "div": "DIV"}
# Quoted from the DreamBooth paper (Ruiz et al., CVPR 2023): Table 1 (subject fidelity, prompt
# fidelity) and Table 3 (prior preservation ablation, DreamBooth on Imagen).
PAPER_ROWS = [
    {"model": "Real images (paper Table 1)", "dino": 0.774, "clip_i": 0.885},
    {"model": "DreamBooth, Imagen (paper Table 1)", "dino": 0.696, "clip_i": 0.812, "clip_t": 0.306},
    {"model": "DreamBooth, Stable Diffusion (paper Table 1)", "dino": 0.668, "clip_i": 0.803, "clip_t": 0.305},
    {"model": "Textual Inversion, Stable Diffusion (paper Table 1)", "dino": 0.569, "clip_i": 0.780, "clip_t": 0.255},
    {"model": "DreamBooth with PPL, Imagen (paper Table 3)", "pres": 0.493, "div": 0.391},
    {"model": "DreamBooth without PPL, Imagen (paper Table 3)", "pres": 0.664, "div": 0.371},
]


def _csv(path: Path, rows: list[dict]):
    if not rows:
        return
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def _mean(values: list):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def load_scores(run: Path) -> list[dict]:
    return [json.loads(f.read_text()) for f in sorted(run.glob("*/scores.json"))]


def summarise(subjects: list[dict]) -> tuple[list[dict], list[dict]]:
    """Per-subject rows, and per-model means over subjects (each subject weighs the same)."""
    per_subject = []
    for s in subjects:
        if s.get("real"):
            per_subject.append({"subject": s["subject"], **s["real"]})
        for label, scored in s["models"].items():
            per_subject.append({"subject": s["subject"], **scored["summary"]})
    overall = []
    for label in dict.fromkeys(r["model"] for r in per_subject):
        rows = [r for r in per_subject if r["model"] == label]
        overall.append({"model": label, "subjects": len(rows),
                        **{m: _mean([r.get(m) for r in rows]) for m in METRICS}})
    return per_subject, overall


def _fmt(v, unavailable: str) -> str:
    return f"{v:.3f}" if isinstance(v, float) else unavailable


def markdown(overall: list[dict], subjects: list[dict], lpips_reason: str) -> str:
    models_used = subjects[0]["metric_models"] if subjects else []
    lines = [f"# DreamBench evaluation ({len(subjects)} subject(s): {', '.join(s['subject'] for s in subjects)})", ""]
    lines += [f"- {m}" for m in models_used]
    lines.append("- CLIP-T prompts: the identifier removed, the class kept (e.g. 'a dog in the snow').")
    if any(s["random_weights"]["cascade"] for s in subjects):
        lines.append("- The images come from tiny RANDOM-initialised cascade weights: they are noise.")
    if any(s["random_weights"]["dino"] or s["random_weights"]["clip"] for s in subjects):
        lines.append("- **Random metric models were used: these numbers mean nothing.**")
    lines += ["", "| model | subjects | " + " | ".join(HEADERS[m] for m in METRICS) + " |",
              "|---|---|" + "---|" * len(METRICS)]
    div_na = "unavailable (LPIPS, see above)" if lpips_reason else "-"
    for r in overall:
        cells = [_fmt(r[m], div_na if m == "div" and r["model"] != "real images" else "-") for m in METRICS]
        lines.append(f"| ours: {r['model']} | {r['subjects']} | " + " | ".join(cells) + " |")
    for r in PAPER_ROWS:
        lines.append(f"| {r['model']} - quoted from the paper | 30 | "
                     + " | ".join(_fmt(r.get(m), "-") for m in METRICS) + " |")
    lines += ["", "Paper rows are quoted from Ruiz et al., DreamBooth (CVPR 2023), Tables 1 and 3; they were "
              "not measured here. PRES: lower = less drift of the class prior; DIV: higher = more diverse."]
    return "\n".join(lines) + "\n"


def plot(overall: list[dict], path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(f"ours: {r['model']}", r) for r in overall]
    rows += [(r["model"].replace(" (paper", "\n(paper"), r) for r in PAPER_ROWS[:2] + PAPER_ROWS[4:5]]
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(rows)
    for j, (name, r) in enumerate(rows):
        xs = [i + j * width for i, m in enumerate(METRICS) if r.get(m) is not None]
        ys = [r[m] for m in METRICS if r.get(m) is not None]
        ax.bar(xs, ys, width, label=name, hatch="//" if "paper" in name else None)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(METRICS))], [HEADERS[m] for m in METRICS])
    ax.set_ylabel("score")
    ax.set_title("DreamBench metrics: ours vs the paper (hatched = quoted from the paper)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write(run: Path, lpips_reason: str) -> dict:
    """(Re)write per_image.csv, per_prompt.csv, summary.csv, results.json, table.md and plot.png."""
    subjects = load_scores(run)
    images = [{"subject": s["subject"], **r} for s in subjects for m in s["models"].values() for r in m["images"]]
    prompts = [{"subject": s["subject"], **r} for s in subjects for m in s["models"].values() for r in m["prompts"]]
    per_subject, overall = summarise(subjects)
    _csv(run / "per_image.csv", images)
    _csv(run / "per_prompt.csv", prompts)
    _csv(run / "summary.csv", per_subject)
    result = {"overall": overall, "per_subject": per_subject, "paper_rows_quoted": PAPER_ROWS,
              "div_unavailable": lpips_reason or None,
              "metric_models": subjects[0]["metric_models"] if subjects else [],
              "random_weights": [s["random_weights"] for s in subjects]}
    (run / "results.json").write_text(json.dumps(result, indent=1))
    (run / "table.md").write_text(markdown(overall, subjects, lpips_reason))
    plot(overall, run / "plot.png")
    return result
