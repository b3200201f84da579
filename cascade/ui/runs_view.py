"""What the UI shows of the runs folder: run folders (any depth), their settings, loss, grids,
summaries and reports, the exports a sampler can use, and SR studies. Read-only, generic about
file names (a study is any folder with results.csv or table.md)."""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from cascade.runs.markers import MARKER, read_marker

UI_DIR = ".cascade-ui"  # the UI's own files under --runs: uploads, Gradio's cache


def _visible(p: Path, root: Path) -> bool:
    return not any(part.startswith(".") for part in p.relative_to(root).parts)


def run_folders(root: Path) -> list[Path]:
    """Every run folder (holding the marker) under `root`, newest first by name."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [m.parent for m in root.rglob(MARKER) if _visible(m.parent, root)]
    return sorted(found, key=lambda p: str(p.relative_to(root)), reverse=True)


def studies(root: Path) -> list[Path]:
    """Folders with an SR study's results (results.csv or table.md) under `root`."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = {p.parent for pat in ("results.csv", "table.md") for p in root.rglob(pat) if _visible(p.parent, root)}
    return sorted(found, key=lambda p: str(p.relative_to(root)), reverse=True)


@dataclass
class Export:
    stage: int
    path: Path
    label: str


def exports(root: Path) -> list[Export]:
    """Fine-tuned exports (export/cascade.json) under `root`, with the stage they are for."""
    out = []
    for run in run_folders(root):
        meta = run / "export" / "cascade.json"
        if meta.is_file():
            try:
                stage = int(json.loads(meta.read_text()).get("stage", 0))
            except (OSError, ValueError):
                continue
            out.append(Export(stage, run / "export", str(run.relative_to(root))))
    return out


def images(folder: Path, pattern: str = "*.png") -> list[Path]:
    return sorted(p for p in Path(folder).glob(pattern) if p.is_file()) if Path(folder).is_dir() else []


def read_text(path: Path, limit: int = 200_000) -> str:
    try:
        return Path(path).read_text(errors="replace")[:limit]
    except OSError:
        return ""


def read_json(path: Path) -> dict | list | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def read_csv(path: Path, limit: int = 500) -> tuple[list[str], list[list[str]]]:
    """Header and up to `limit` rows, all as strings."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
    except OSError:
        return [], []
    return (rows[0], rows[1:limit + 1]) if rows else ([], [])


def losses(run: Path) -> list[tuple[int, float, float | None]]:
    """(step, instance loss, prior loss or None) from the run's loss.csv (written at checkpoints)."""
    header, rows = read_csv(Path(run) / "loss.csv", limit=10**6)
    if not header:
        return []
    i, j, k = (header.index(c) if c in header else None for c in ("step", "instance_loss", "prior_loss"))
    out = []
    for r in rows:
        try:
            out.append((int(r[i]), float(r[j]), float(r[k]) if k is not None and r[k] != "" else None))
        except (ValueError, IndexError, TypeError):
            continue
    return out


def describe(run: Path) -> dict:
    """Everything the Runs tab shows of one folder."""
    run = Path(run)
    marker = read_marker(run)
    return {
        "settings": marker,
        "config": read_text(run / "config.yaml"),
        "loss_png": run / "loss.png" if (run / "loss.png").is_file() else None,
        "validation": images(run / "samples", "step-*.png"),
        "grids": images(run) + images(run / "export"),
        "summary": read_json(run / "summary.json") or read_json(run / "samples.json"),
        "report": run / "report.html" if (run / "report.html").is_file() else None,
        "log": read_text(run / "log.txt")[-20_000:],
    }
