"""`cascade toy ...`: the toy world's commands (pretrain; check measures the readers' bars)."""
from __future__ import annotations

import argparse
import logging
from dataclasses import fields
from pathlib import Path


def add_commands(sub):
    toy = sub.add_parser("toy", help="the toy world: pretrain its cascade, measure it").add_subparsers(
        dest="toy_command", required=True)
    from cascade.toy.pretrain import PretrainConfig

    p = toy.add_parser("pretrain", help="train one stage of the toy cascade (deterministic, resumable)")
    p.add_argument("--output", required=True, help="run folder: model/ (diffusers layout), checkpoints, logs")
    p.add_argument("--resume", action="store_true", help="continue from the stage's checkpoint in --output")
    for f in fields(PretrainConfig):
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    p.set_defaults(func=cmd_pretrain)


def cmd_pretrain(args):
    from cascade.toy.pretrain import PretrainConfig, pretrain

    cfg = PretrainConfig(**{f.name: getattr(args, f.name) for f in fields(PretrainConfig)})
    if cfg.stage not in (1, 2):
        from stages.errors import InputError

        raise InputError(f"--stage must be 1 or 2, got {cfg.stage}")
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(out / f"stage{cfg.stage}.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logging.getLogger("cascade").addHandler(handler)
    logging.getLogger("cascade").setLevel(logging.INFO)
    losses = pretrain(out, cfg, resume=args.resume)
    if losses:
        print(f"stage {cfg.stage}: {len(losses)} steps, loss {losses[0]:.4f} -> {sum(losses[-20:]) / min(20, len(losses)):.4f}; "
              f"EMA weights in {out / 'model' / f'stage{cfg.stage}'}")
