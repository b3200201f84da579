"""The device check: a few training steps of every preset (and each engine config one GPU can run) on
random-initialised real-size IF models, one JSON record per cell (cascade/perf/device_check.py).

    python scripts/device_check.py --output benchmarks/device-check-h100.json          # on one CUDA GPU
    python scripts/device_check.py --size tiny --output /tmp/device-check.json          # anywhere, tiny models
"""
import argparse
import json
import sys
from pathlib import Path

from cascade.perf import device_check


def _gb(x) -> str:
    return f"{x / 1e9:.2f} GB" if x else "-"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", required=True, type=Path)
    p.add_argument("--size", choices=("real", "tiny"), default="real")
    p.add_argument("--steps", type=int, default=3, help="timed steps per cell (after one untimed)")
    p.add_argument("--budget", type=float, default=420.0, help="seconds for the whole check")
    p.add_argument("--cell-budget", type=float, default=45.0, help="seconds per preset cell")
    p.add_argument("--engine-budget", type=float, default=90.0, help="seconds per engine cell (a fresh process)")
    p.add_argument("--no-engines", action="store_true", help="skip the accelerate engine cells")
    p.add_argument("--no-plans", action="store_true", help="skip the planner's traces")
    p.add_argument("--plans-wait", type=float, default=None, help="seconds to wait for the traces after the cells")
    p.add_argument("--cells", default="", help="comma-separated cell names (default: all)")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error("--steps: at least 1")
    report = device_check.check(args.size, args.steps, args.cell_budget, args.engine_budget, args.budget,
                                engines=not args.no_engines, plans=not args.no_plans, plans_wait=args.plans_wait,
                                only=[c for c in args.cells.split(",") if c] or None)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.output.with_name(args.output.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str))
    tmp.replace(args.output)
    for c in report["cells"]:
        print(f"{c['cell']}: {c.get('status')}, loss finite {c.get('loss_finite')}, step {c.get('step_s_median')} s, "
              f"peak {_gb(c.get('max_memory_allocated'))}, plan {_gb(c.get('planned_peak'))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
