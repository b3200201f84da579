"""`cascade bench`: timing (default) or `--estimate-memory` (the planner), parsing and run."""
from __future__ import annotations

from pathlib import Path

from cascade.cli.flags import count


def add_commands(sub, common_config):
    p = sub.add_parser("bench", help="time training/sampling of a stage, or plan memory (--estimate-memory)")
    common_config(p)
    p.add_argument("--stage", type=int, choices=[1, 2], default=1, help="which stage's UNet to time or plan")
    p.add_argument("--steps", type=count(1), default=5, help="timed training steps (median reported)")
    p.add_argument("--warmup", type=count(0), default=2, help="untimed steps first")
    p.add_argument("--sample-steps", type=count(0), default=10, help="sampler steps timed (0: skip sampling)")
    p.add_argument("--batch", type=count(1), default=None, help="instance images per step (default: the config's)")
    p.add_argument("--resolution", type=count(1), default=None,
                   help="training input size (default: the stage's, 64 or 256); smaller for CPU measurements")
    p.add_argument("--compare", action="store_true", help="also run the naive path (on CPU: each in its own process)")
    p.add_argument("--estimate", action="store_true",
                   help="also trace each timed step with the memory planner and report its estimate beside the measure")
    p.add_argument("--no-t5", action="store_true", help="naive path without the resident T5 (small machines)")
    p.add_argument("--output", default=None, help="JSON report path (default: print only)")
    p.add_argument("--estimate-memory", action="store_true", help="plan device memory instead of timing")
    p.add_argument("--models", default=None,
                   help="with --estimate-memory: comma-separated architectures (if-i-m,if-i-l,if-i-xl,if-ii-m,if-ii-l) "
                        "for a table of option combinations; default: the config's stage model")
    p.add_argument("--combos", default=None, help="with --models: naive,before,preset,lora (default: all)")
    p.add_argument("--gpu-memory", default=None, help="e.g. 40GB: say whether the config fits, and what to switch on")
    p.add_argument("--processes", type=int, default=1,
                   help="with --estimate-memory: plan one process of an N-process DDP run (optimizer-in-backward off)")
    p.add_argument("--cpu-run", action="store_true",
                   help="with --estimate-memory: plan a CPU run (no autocast), as `cascade bench` runs on CPU")


def _check(args):
    from stages.errors import InputError

    if args.steps < 1 or args.warmup < 0 or args.sample_steps < 0:
        raise InputError("--steps must be >= 1, --warmup and --sample-steps >= 0")
    if args.batch is not None and args.batch < 1:
        raise InputError("--batch must be >= 1")
    if args.processes < 1:
        raise InputError("--processes must be >= 1")
    if args.gpu_memory is not None:  # before the planner's minutes of tracing, not after them
        from cascade.perf.planner import parse_size

        parse_size(args.gpu_memory)


def _check_resolution(cfg, args):
    """The UNet halves the input once per level but the last: the size must divide by that factor."""
    from cascade.perf import arch
    from stages.errors import InputError

    if args.resolution is None:
        return
    model = cfg.models.stage1 if args.stage == 1 else cfg.models.stage2
    name = arch.arch_for(model)
    levels = len(arch.unet_config(name)["block_out_channels"]) if name else (2 if args.stage == 1 else 4)
    factor = 2 ** (levels - 1)
    if args.resolution % factor:
        raise InputError(f"--resolution {args.resolution}: the stage {args.stage} UNet ({name or 'tiny'}) halves "
                         f"the size {levels - 1} times, so the resolution must be a multiple of {factor}")


def cmd_bench(args):
    from cascade.config import load_config

    _check(args)
    cfg = load_config(args.config, args.overrides)
    _check_resolution(cfg, args)
    if args.estimate_memory:
        from cascade.perf import planner_report

        report = planner_report.run(cfg, args)
    else:
        from cascade.perf import bench

        report = bench.bench(cfg, args.stage, args.steps, args.warmup, args.sample_steps, args.compare, args.batch,
                             False if args.no_t5 else None, resolution=args.resolution,
                             estimate=args.estimate)
    if args.output:
        from cascade.perf.bench import write_report

        write_report(report, Path(args.output))
        print(f"report: {args.output}")
    print(report["markdown"])


COMMANDS = {"bench": cmd_bench}
