"""Redraw a training run's validation plot (loss beside the live measures, the drift budget and the
chosen best step) from its loss.csv, validation.csv and export/cascade.json:

    python scripts/plot_validation.py RUN_DIR --out docs/img/toy-validation.png [--title TEXT]
"""
import argparse
import csv
import json
import sys
from pathlib import Path

from stages import validation_log


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return [{k: (float(v) if v != "" else "") for k, v in r.items()} for r in csv.DictReader(f)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run")
    p.add_argument("--out", required=True)
    p.add_argument("--title", default="")
    a = p.parse_args(argv)
    run = Path(a.run)
    best = json.loads((run / "export" / "cascade.json").read_text()).get("best_checkpoint") or {}
    validation_log.plot(Path(a.out), _rows(run / "loss.csv"), _rows(run / "validation.csv"), best.get("step"),
                        best.get("budget"), a.title)
    return 0


if __name__ == "__main__":
    sys.exit(main())
