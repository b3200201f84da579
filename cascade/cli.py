"""The `cascade` command. Argument parsing lives here (`parse_args(argv)`, testable); scripts/ are
thin wrappers over it for `accelerate launch` / `torchrun`."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from cascade.config import ConfigError, load_config
from stages.errors import InputError

log = logging.getLogger("cascade")


def _common_config(p: argparse.ArgumentParser):
    p.add_argument("--config", default=None, help="preset name (tiny, if-m, if-l, if-xl) or YAML path; default tiny")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set stage1.train.learning_rate=1e-5 (repeatable)")


def _train_args(p: argparse.ArgumentParser, stage: int):
    _common_config(p)
    p.add_argument("--subject", required=True, help="folder of 3-5 photos of the subject")
    p.add_argument("--class-noun", required=True, help="the subject's class, e.g. dog")
    p.add_argument("--identifier", default=None, help="identifier token; default: a rare T5 token")
    p.add_argument("--class-dir", default=None, help="class images (kept, topped up); default RUN/class_images")
    p.add_argument("--model", default=None, help=f"stage {stage} hub id or folder (overrides models.stage{stage})")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--lora-rank", type=int, default=None, help="LoRA rank; 0 = full fine-tuning")
    p.add_argument("--report-to", choices=["none", "tensorboard", "wandb"], default=None)
    if stage == 2:
        p.add_argument("--noise-aug", default=None, metavar="MIN[:MAX]",
                       help="training noise-augmentation level(s), integers in 0..999 (default 0:0, as the paper)")
        p.add_argument("--sample-noise-level", type=int, default=None, help="stage II sampling level (default: MAX)")
    p.add_argument("--output", default=None, help="run folder; default runs/NNNNN-stageN-CLASS")
    p.add_argument("--resume", action="store_true", help="continue the run in --output from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cascade", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("build-tiny", help="write tiny random IF components in the diffusers layout")
    p.add_argument("--output", required=True)

    p = sub.add_parser("identifier", help="pick a rare T5 token as the subject identifier")
    _common_config(p)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--class-noun", default="")

    p = sub.add_parser("class-images", help="generate class images with the frozen model(s)")
    _common_config(p)
    p.add_argument("--class-noun", required=True)
    p.add_argument("--num", type=int, required=True)
    p.add_argument("--stage", type=int, choices=[1, 2], default=1, help="1: 64px; 2: 256px via stage I -> II")
    p.add_argument("--output", required=True, help="folder (existing images are kept)")
    p.add_argument("--seed", type=int, default=0)

    train = sub.add_parser("train", help="fine-tune one stage").add_subparsers(dest="stage", required=True)
    _train_args(train.add_parser("stage1", help="64px base model with prior preservation"), 1)
    _train_args(train.add_parser("stage2", help="64->256 super-resolution with low noise augmentation"), 2)
    from cascade import cli_sample

    cli_sample.add_commands(sub, _common_config)
    from cascade import cli_eval

    cli_eval.add_commands(sub, _common_config)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def _train_overrides(args) -> list[str]:
    s = f"stage{args.stage[-1]}"
    out = []
    if args.model:
        out.append(f"models.{s}={args.model}")
    if args.identifier:
        out.append(f"identifier.token={args.identifier}")
    if args.max_steps is not None:
        out.append(f"{s}.train.max_steps={args.max_steps}")
    if args.lora_rank is not None:
        out.append(f"{s}.train.lora_rank={args.lora_rank}")
    if args.report_to:
        out.append(f"{s}.train.report_to={args.report_to}")
    if getattr(args, "noise_aug", None):
        lo, _, hi = args.noise_aug.partition(":")
        out += [f"{s}.train.noise_aug_min={lo}", f"{s}.train.noise_aug_max={hi or lo}"]
    if getattr(args, "sample_noise_level", None) is not None:
        out.append(f"{s}.sample.noise_level={args.sample_noise_level}")
    return out


def cmd_train(args):
    from cascade.training import TrainRequest, train

    cfg = load_config(args.config, _train_overrides(args) + args.overrides)
    result = train(TrainRequest(int(args.stage[-1]), cfg, args.subject, args.class_noun, args.output,
                                args.class_dir, args.resume, args.overwrite))
    print(f"run folder: {result.run_dir}\nexport: {result.export_dir}")


def cmd_build_tiny(args):
    from cascade.tiny import build_tiny

    print(f"tiny components (random weights) written to {build_tiny(Path(args.output))}")


def cmd_identifier(args):
    from cascade import models
    from cascade.identifier import pick_identifier
    from cascade.text import load_tokenizer

    cfg = load_config(args.config, args.overrides)
    idc = cfg.identifier
    tok = load_tokenizer(models.resolve(cfg).text_encoder)
    token, token_id = pick_identifier(tok, idc.seed if args.seed is None else args.seed, idc.min_id, idc.max_id,
                                      idc.max_chars, avoid=tuple(args.class_noun.lower().split()))
    print(f"{token}\t(T5 token id {token_id})")


def cmd_class_images(args):
    from cascade import class_images, models, runner
    from cascade.identifier import class_prompt
    from cascade.text import TextEncoder
    from stages.components import describe_source

    cfg = load_config(args.config, args.overrides)
    if args.num < 1:
        raise ConfigError("--num must be >= 1")
    paths = models.resolve(cfg)
    prompt = class_prompt(args.class_noun)
    embeds = TextEncoder(paths.text_encoder, cfg.models.cache_dir, cfg.max_text_length,
                         models.weights_dtype(cfg), cfg.models.variant).encode([prompt, ""])

    def factory():
        if args.stage == 2:
            return runner.class_pair_sampler(cfg, paths, embeds[prompt], embeds[""])
        base1 = describe_source(paths.stage1).base
        return lambda seeds: runner.run_stage1(base1, cfg, embeds[prompt].expand(len(seeds), -1, -1), embeds[""], seeds)

    files = class_images.generate(Path(args.output), args.num, factory, 8 * cfg.stage1.sample.batch_size, args.seed,
                                  prompt)
    print(f"{len(files)} class images in {args.output}")


COMMANDS = {"train": cmd_train, "build-tiny": cmd_build_tiny, "identifier": cmd_identifier,
            "class-images": cmd_class_images}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from cascade.runs import console_logging

    console_logging()
    from cascade.cli_eval import COMMANDS as EVAL_COMMANDS
    from cascade.cli_sample import COMMANDS as SAMPLE_COMMANDS

    try:
        {**COMMANDS, **SAMPLE_COMMANDS, **EVAL_COMMANDS}[args.command](args)
    except (InputError, FileNotFoundError) as e:
        print(f"cascade {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
