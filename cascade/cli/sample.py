"""`cascade sample` (chained sampling) and `cascade demo` (the whole mission on the offline preset)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from cascade.cli import flags
from cascade.config import ConfigError, load_config

# one call holds every image of every stage in memory (stage III: 3 MB each): a bound found up front,
# not an allocator error a minute in; more images are more calls with other --seed values
MAX_IMAGES = 1000


def add_commands(sub, common_config):
    p = sub.add_parser("sample", help="generate images through the cascade (stage I -> II -> optional III)")
    common_config(p, "stage2.sample.noise_level=100")
    p.add_argument("--prompt", action="append", default=[], help="prompt (repeatable); [V] = the stage I identifier")
    p.add_argument("--prompts-file", default=None, help="a text file with one prompt per line")
    p.add_argument("--negative-prompt", default="", help="what to steer away from (default: the empty prompt)")
    p.add_argument("--num-images", type=flags.number(int, 1, MAX_IMAGES), default=4,
                   help=f"images per prompt (at most {MAX_IMAGES} images per call over all prompts)")
    p.add_argument("--seed", type=flags.seed, default=0, help="image k uses seed + k (default 0)")
    p.add_argument("--stage1", default=None, help="stage I: hub id, folder or fine-tuned export (default: config)")
    p.add_argument("--stage2", default=None, help="stage II: hub id, folder, export, or none to stop at 64px")
    p.add_argument("--stage3", default=None, help="stage III x4 upscaler: none (default) or hub id / folder / tiny")
    p.add_argument("--output", default=None, help="output folder; default runs/NNNNN-sample")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")

    p = sub.add_parser("demo", help="the whole mission end to end: the toy world by default, offline, CPU")
    common_config(p, default_preset="toy")
    p.add_argument("--output", default=None, help="demo folder; default runs/NNNNN-demo")
    p.add_argument("--subject", default=None,
                   help="subject photos (default: the toy world's subject with the toy preset, else synthetic images)")
    p.add_argument("--class-noun", default=None, help="the subject's class (needed with --subject)")
    p.add_argument("--fast", action="store_true", help="fewer steps and images (for tests)")
    p.add_argument("--stage3", action="store_true", help="also upscale to 1024 with the stage III model")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")


def _read_prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file:
        f = Path(args.prompts_file)
        if f.is_dir():
            raise ConfigError(f"--prompts-file {f} is a folder; give a text file with one prompt per line")
        if not f.is_file():
            raise FileNotFoundError(f"--prompts-file not found: {f}")
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"--prompts-file {f}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") \
                from None
        prompts += [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    if not prompts:
        raise ConfigError("give at least one --prompt or a --prompts-file")
    for i, p in enumerate(args.prompt):
        if not p.strip():
            raise ConfigError(f"--prompt number {i + 1} is empty; give the text to sample")
    return prompts


def cmd_sample(args):
    from cascade import model_checks, models
    from cascade.runs import folders
    from cascade.runner import check_request, fill_identifier, run_cascade

    if args.num_images < 1:
        raise ConfigError(f"--num-images must be >= 1, got {args.num_images}")
    prompts = _read_prompts(args)
    if len(prompts) * args.num_images > MAX_IMAGES:
        raise ConfigError(f"--num-images {args.num_images} x {len(prompts)} prompts is {len(prompts) * args.num_images} "
                          f"images; one call makes at most {MAX_IMAGES} (they are held in memory): sample in several "
                          f"calls with other --seed values")
    cfg = load_config(args.config, args.overrides)
    paths = models.resolve(cfg)
    for stage in ("stage1", "stage2", "stage3"):
        if getattr(args, stage) is not None:
            paths = dataclasses.replace(paths, **{stage: models.resolve_name(cfg, getattr(args, stage), stage)})
    if args.stage3 not in (None, "none") and paths.stage2 == "none":
        raise ConfigError(f"--stage3 {args.stage3}: stage III upscales stage II's output, but stage II is none")
    from stages.setup import process_state

    # every input checked before the output folder exists: a failed command leaves nothing behind
    model_checks.check_models(paths, cfg.models.variant, (1, 2, 3) if paths.stage2 != "none" else (1,))
    check_request(paths, prompts)  # cheap (configs only)
    for prompt in prompts:
        fill_identifier(prompt, paths.stage1)
    state = process_state(cfg.distributed_timeout_minutes)
    inputs = {**folders.model_inputs(paths), "prompts file": args.prompts_file}
    output = folders.prepare_on_main(state, lambda: folders.prepare_output(args.output, "sample", overwrite=args.overwrite,
                                                                           protected=inputs))
    folders.start_logging(output, cfg, state.is_main_process)
    result = run_cascade(cfg, paths, prompts, args.num_images, args.seed, output, args.negative_prompt)
    if state.is_main_process:
        print(f"images in {result.folder} (samples.json records prompts, seeds and models)")
        if paths.uses_tiny:
            print("note: tiny random-initialised weights were used; the images are noise")


def cmd_demo(args):
    from cascade.cli.demo import run_demo

    cfg = load_config(args.config or "toy", args.overrides)  # the toy world unless a preset is named
    summary = run_demo(cfg, args.output, args.subject, args.class_noun, fast=args.fast, with_stage3=args.stage3,
                       overwrite=args.overwrite)
    print(f"report: {summary['report']}\nsummary: {summary['summary']}")
    print(f"weights: {summary['weights']}")
    if summary.get("readers_note"):
        print(f"note: {summary['readers_note']}")


COMMANDS = {"sample": cmd_sample, "demo": cmd_demo}
