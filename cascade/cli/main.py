"""The `cascade` command. Argument parsing lives here (`parse_args(argv)`, testable); scripts/ are
thin wrappers over it for `accelerate launch` / `torchrun`."""
from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

from cascade.cli import flags
from cascade.config import ConfigError, load_config
from stages.errors import InputError, TrainingDiverged

log = logging.getLogger("cascade")


DESCRIPTION = ("DreamBooth for the DeepFloyd IF pixel cascade: fine-tune stage I (64px) and stage II "
               "(64->256 super-resolution) on 3-5 photos of a subject, then sample through the cascade. "
               "Offline default: tiny random-initialised components (their images are noise).")


def presets() -> list[str]:
    from cascade.config import CONFIG_DIR

    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def _common_config(p: argparse.ArgumentParser, example: str = "stage1.train.learning_rate=1e-5",
                   default_preset: str = "tiny"):
    p.add_argument("--config", default=None, help=f"preset name ({', '.join(presets())}) or YAML path; "
                                                  f"default {default_preset}")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override any config key, e.g. --set {example} (repeatable; the value is YAML, "
                        f"string settings keep the text as typed)")


def _train_args(p: argparse.ArgumentParser, stage: int):
    _common_config(p, f"stage{stage}.train.learning_rate=1e-5")
    p.add_argument("--subject", required=True, help="folder of 3-5 photos of the subject")
    p.add_argument("--class-noun", required=True, help="the subject's class, e.g. dog")
    p.add_argument("--identifier", default=None, help="identifier token; default: a rare T5 token")
    p.add_argument("--class-dir", default=None, help="class images (kept, topped up); default RUN/class_images")
    p.add_argument("--model", default=None, help=f"stage {stage} hub id or folder (overrides models.stage{stage})")
    p.add_argument("--max-steps", type=flags.count(1), default=None,
                   help=f"training steps (overrides stage{stage}.train.max_steps)")
    p.add_argument("--lora-rank", type=flags.count(0), default=None, help="LoRA rank; 0 = full fine-tuning")
    p.add_argument("--report-to", choices=["none", "tensorboard", "wandb"], default=None,
                   help="log losses and learning rate to a tracker in the run folder (needs the package)")
    p.add_argument("--captions", choices=["none", "sidecar", "metadata"], default=None,
                   help="per-image captions from <image>.txt files or metadata.jsonl (default: one prompt)")
    if stage == 2:
        p.add_argument("--noise-aug", default=None, metavar="MIN[:MAX]",
                       help="training noise-augmentation level(s), integers in 0..999 (default 0:0, as the paper)")
        p.add_argument("--sample-noise-level", type=flags.noise_level, default=None, help="stage II sampling level (default: MAX)")
    p.add_argument("--output", default=None, help="run folder; default runs/NNNNN-stageN-CLASS")
    p.add_argument("--resume", action="store_true", help="continue the run in --output from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cascade", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("build-tiny", help="write tiny random IF components in the diffusers layout")
    p.add_argument("--output", required=True, help="folder to create (refused if it exists)")
    p.add_argument("--sizes", default="64:256", metavar="LOW:HIGH", help="stage I:stage II sample sizes")

    p = sub.add_parser("identifier", help="pick a rare T5 token as the subject identifier")
    _common_config(p)
    p.add_argument("--seed", type=flags.seed, default=None, help="picks among the rare tokens (default identifier.seed)")
    p.add_argument("--class-noun", default="", help="never pick this word as the identifier")

    p = sub.add_parser("class-images", help="generate class images with the frozen model(s)")
    _common_config(p)
    p.add_argument("--class-noun", required=True, help="the class to generate, e.g. dog (prompt \"a dog\")")
    p.add_argument("--num", type=flags.count(1), required=True, help="how many images the folder should hold")
    p.add_argument("--stage", type=int, choices=[1, 2], default=1,
                   help="1: stage I's size (IF: 64px); 2: stage II's (IF: 256px) via stage I -> II")
    p.add_argument("--output", required=True, help="folder (existing images are kept)")
    p.add_argument("--seed", type=flags.seed, default=0, help="image i is made from seed + i (default 0)")

    train = sub.add_parser("train", help="fine-tune one stage").add_subparsers(dest="stage", required=True)
    _train_args(train.add_parser("stage1", help="base model (IF: 64px) with prior preservation"), 1)
    _train_args(train.add_parser("stage2", help="super-resolution (IF: 64->256) with low noise augmentation"), 2)
    from cascade.cli import sample

    sample.add_commands(sub, _common_config)
    from cascade.cli import bench

    bench.add_commands(sub, _common_config)

    from cascade.cli import toy

    toy.add_commands(sub)

    from cascade.cli import evaluate

    evaluate.add_commands(sub, _common_config)
    from cascade.cli import ui

    ui.add_commands(sub)
    from cascade.cli import push

    push.add_commands(sub)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


_NOISE_AUG = re.compile(r"^\s*(\d+)\s*(?::\s*(\d+)\s*)?$")


def parse_noise_aug(text: str) -> tuple[int, int]:
    """`--noise-aug MIN[:MAX]` as two integers (never YAML, which reads "5:5" as 305)."""
    m = _NOISE_AUG.match(text)
    if not m:
        raise ConfigError(f"--noise-aug {text!r}: expected MIN or MIN:MAX, integers in 0..999 (e.g. 0:20)")
    lo = int(m.group(1))
    return lo, int(m.group(2)) if m.group(2) is not None else lo


def _train_flags(args) -> list[tuple[str, str, object]]:
    """Typed flags as (flag, config key, value): strings stay strings, whatever they look like."""
    s = f"stage{args.stage[-1]}"
    out = []
    if args.model is not None:
        out.append(("--model", f"models.{s}", args.model))
    if args.identifier is not None:
        out.append(("--identifier", "identifier.token", args.identifier))
    if args.max_steps is not None:
        out.append(("--max-steps", f"{s}.train.max_steps", args.max_steps))
    if args.lora_rank is not None:
        out.append(("--lora-rank", f"{s}.train.lora_rank", args.lora_rank))
    if args.report_to:
        out.append(("--report-to", f"{s}.train.report_to", args.report_to))
    if args.captions:
        out.append(("--captions", f"{s}.train.captions", args.captions))
    if getattr(args, "noise_aug", None) is not None:
        lo, hi = parse_noise_aug(args.noise_aug)
        out += [("--noise-aug", f"{s}.train.noise_aug_min", lo), ("--noise-aug", f"{s}.train.noise_aug_max", hi)]
    if getattr(args, "sample_noise_level", None) is not None:
        out.append(("--sample-noise-level", f"{s}.sample.noise_level", args.sample_noise_level))
    return out


def cmd_train(args):
    from cascade.cli import live_measures
    from cascade.training import TrainRequest, train

    cfg = load_config(args.config, args.overrides, _train_flags(args))
    stage = int(args.stage[-1])
    result = train(TrainRequest(stage, cfg, args.subject, args.class_noun, args.output, args.class_dir, args.resume,
                                args.overwrite, measures=live_measures.for_training(cfg, stage, args.subject)))
    print(f"run folder: {result.run_dir}\nexport: {result.export_dir}")


def cmd_build_tiny(args):
    from cascade.offline.tiny import build_tiny

    low, _, high = args.sizes.partition(":")
    if not (low.isdigit() and high.isdigit()):
        raise ConfigError(f"--sizes {args.sizes!r}: expected LOW:HIGH, e.g. 16:64")
    print(f"tiny components (random weights) written to {build_tiny(Path(args.output), sizes=(int(low), int(high)))}")


def cmd_identifier(args):
    from cascade import model_checks, models
    from cascade.identifier import pick_identifier
    from cascade.text import load_tokenizer

    cfg = load_config(args.config, args.overrides)
    idc = cfg.identifier
    text_source = models.resolve(cfg).text_encoder
    model_checks.check_source(text_source, "tokenizer", "models.text_encoder", None)
    tok = load_tokenizer(text_source)
    token, token_id = pick_identifier(tok, idc.seed if args.seed is None else args.seed, idc.min_id, idc.max_id,
                                      idc.max_chars, avoid=tuple(args.class_noun.lower().split()))
    print(f"{token}\t(T5 token id {token_id})")


def cmd_class_images(args):
    from cascade import class_images, model_checks, models, runner
    from cascade.runs import markers
    from cascade.identifier import class_prompt
    from cascade.text import TextEncoder
    from stages import components, engines
    from stages.components import describe_source

    cfg = load_config(args.config, args.overrides)
    if args.num < 1:
        raise ConfigError("--num must be >= 1")
    state = engines.process_state(cfg.distributed_timeout_minutes)  # under torchrun/accelerate: split the work
    paths = engines.main_first(state, lambda: models.resolve(cfg))
    model_checks.check_models(paths, cfg.models.variant, (1, 2) if args.stage == 2 else (1,))
    for stage in (1, 2)[:args.stage]:
        components.check_stage(getattr(paths, f"stage{stage}"), stage, f"models.stage{stage}")
    output = Path(args.output)
    if output.exists() and not output.is_dir():
        raise InputError(f"--output {output} is a file, not a folder")
    if state.is_main_process:
        markers.track(output, created=not output.exists())  # removed again if the command fails before any image
    prompt = class_prompt(args.class_noun)
    from cascade import resolutions

    size = resolutions.stage1_size(paths.stage1) if args.stage == 1 else \
        resolutions.stage2_sizes(paths.stage2, paths.stage1)[0]
    made_by = {"model": class_images.model_name(*[describe_source(getattr(paths, f"stage{s}")).base
                                                  for s in range(1, args.stage + 1)]), "size": size}
    class_images.check_manifest(output, prompt, args.stage, **made_by)
    class_images.check_target(output)
    encoder = TextEncoder(paths.text_encoder, cfg.models.cache_dir, cfg.max_text_length, models.weights_dtype(cfg),
                          cfg.models.variant, device=models.text_encoder_device(cfg))
    embeds = engines.main_first(state, lambda: encoder.encode([prompt, ""]))  # T5 once; the others read its cache

    def factory():
        if args.stage == 2:
            return runner.class_pair_sampler(cfg, paths, embeds[prompt], embeds[""])
        base1 = describe_source(paths.stage1).base
        return lambda seeds: runner.run_stage1(base1, cfg, embeds[prompt].expand(len(seeds), -1, -1), embeds[""], seeds)

    files = class_images.generate(output, args.num, factory, 8 * cfg.stage1.sample.batch_size, args.seed,
                                  prompt, args.stage, state, **made_by)
    if state.is_main_process:
        print(f"{len(files)} class images in {args.output}")


COMMANDS = {"train": cmd_train, "build-tiny": cmd_build_tiny, "identifier": cmd_identifier,
            "class-images": cmd_class_images}


def main(argv: list[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):  # a non-UTF-8 file name in a message prints escaped, never raises
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    try:
        args = parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a bad flag value (2), its one line already printed
        return e.code if isinstance(e.code, int) else 2
    from cascade.runs.folders import console_logging

    console_logging()
    from cascade.cli.bench import COMMANDS as BENCH_COMMANDS
    from cascade.cli.evaluate import COMMANDS as EVAL_COMMANDS
    from cascade.cli.push import COMMANDS as PUSH_COMMANDS
    from cascade.cli.sample import COMMANDS as SAMPLE_COMMANDS
    from cascade.cli.ui import COMMANDS as UI_COMMANDS

    from cascade.cli import failures
    from cascade.runs import folders, markers

    markers.begin()
    failed, name = True, failures.command_name(args)
    try:
        {**COMMANDS, **SAMPLE_COMMANDS, **BENCH_COMMANDS, **EVAL_COMMANDS, **PUSH_COMMANDS, **UI_COMMANDS,
         "toy": lambda a: a.func(a)}[args.command](args)
        failed = False
    except (InputError, FileNotFoundError) as e:
        print(f"cascade {name}: error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"cascade {name}: error: {e}", file=sys.stderr)
        return 1
    except BaseException as e:  # disk full, Ctrl-C, undecodable text or pickles: one line (cascade.cli.failures)
        handled = failures.one_line(e)
        if handled is None:
            raise
        folders.stop_file_logging()
        kept = failures.run_folders(args)
        markers.finish(True)  # first, so the hint knows which run folder is still there
        message, code = handled
        print(f"cascade {name}: error: {message}{failures.hint(e, args, kept)}", file=sys.stderr)
        return code
    finally:
        folders.stop_file_logging()
        markers.finish(failed)  # locks released; a folder this command made without results removed
    return 0


if __name__ == "__main__":
    sys.exit(main())
