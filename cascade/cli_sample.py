"""`cascade sample` (chained sampling) and `cascade demo` (the whole mission on the offline preset)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from cascade.config import ConfigError, load_config


def add_commands(sub, common_config):
    p = sub.add_parser("sample", help="generate images through the cascade (stage I -> II -> optional III)")
    common_config(p)
    p.add_argument("--prompt", action="append", default=[], help="prompt (repeatable); [V] = the stage I identifier")
    p.add_argument("--prompts-file", default=None, help="a text file with one prompt per line")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--num-images", type=int, default=4, help="images per prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stage1", default=None, help="stage I: hub id, folder or fine-tuned export (default: config)")
    p.add_argument("--stage2", default=None, help="stage II: hub id, folder, export, or none to stop at 64px")
    p.add_argument("--stage3", default=None, help="stage III x4 upscaler: none (default) or hub id / folder / tiny")
    p.add_argument("--output", default=None, help="output folder; default runs/NNNNN-sample")
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("demo", help="the whole mission end to end: the toy world by default, offline, CPU")
    common_config(p)
    p.add_argument("--output", default=None, help="demo folder; default runs/NNNNN-demo")
    p.add_argument("--subject", default=None, help="subject photos (default with the toy world: its subject; else DreamBench dog if present, else synthetic)")
    p.add_argument("--class-noun", default=None)
    p.add_argument("--fast", action="store_true", help="fewer steps and images (for tests)")
    p.add_argument("--stage3", action="store_true", help="also upscale to 1024 with the stage III model")
    p.add_argument("--overwrite", action="store_true")


def _read_prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file:
        f = Path(args.prompts_file)
        if not f.is_file():
            raise FileNotFoundError(f"--prompts-file not found: {f}")
        prompts += [line.strip() for line in f.read_text().splitlines() if line.strip() and not line.startswith("#")]
    if not prompts:
        raise ConfigError("give at least one --prompt or a --prompts-file")
    return prompts


def cmd_sample(args):
    from cascade import models, runs
    from cascade.runner import run_cascade

    if args.num_images < 1:
        raise ConfigError(f"--num-images must be >= 1, got {args.num_images}")
    prompts = _read_prompts(args)
    cfg = load_config(args.config, args.overrides)
    paths = models.resolve(cfg)
    for stage in ("stage1", "stage2", "stage3"):
        if getattr(args, stage) is not None:
            paths = dataclasses.replace(paths, **{stage: models.resolve_name(cfg, getattr(args, stage), stage)})
    from cascade.resolutions import check_cascade
    from stages.setup import process_state

    check_cascade(paths.stage1, paths.stage2)  # cheap (configs only), before the output folder exists
    state = process_state()
    output = runs.prepare_output(args.output, "sample", overwrite=args.overwrite) if state.is_main_process else None
    output = _broadcast_path(state, output)
    runs.start_logging(output, cfg, state.is_main_process)
    result = run_cascade(cfg, paths, prompts, args.num_images, args.seed, output, args.negative_prompt)
    if state.is_main_process:
        print(f"images in {result.folder} (samples.json records prompts, seeds and models)")
        if paths.uses_tiny:
            print("note: tiny random-initialised weights were used; the images are noise")


def _broadcast_path(state, path):
    if state.num_processes == 1:
        return path
    from accelerate.utils import broadcast_object_list

    holder = [str(path) if path else None]
    broadcast_object_list(holder)
    return Path(holder[0])


def cmd_demo(args):
    from cascade.demo import run_demo

    cfg = load_config(args.config or "toy", args.overrides)  # the toy world unless a preset is named
    summary = run_demo(cfg, args.output, args.subject, args.class_noun, fast=args.fast, with_stage3=args.stage3,
                       overwrite=args.overwrite)
    print(f"report: {summary['report']}\nsummary: {summary['summary']}")
    print(f"weights: {summary['weights']}")


COMMANDS = {"sample": cmd_sample, "demo": cmd_demo}
