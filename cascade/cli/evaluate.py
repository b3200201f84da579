"""`cascade evaluate` (DreamBench metrics) and `cascade study-sr` (the super-resolution study):
argument parsing and the calls into cascade.evaluation.dreambench / cascade.evaluation.sr_study."""
from __future__ import annotations

from cascade.cli import flags
from cascade.config import ConfigError, load_config
from cascade.evaluation.metrics import DEFAULT_CLIP, DEFAULT_DINO

DEFAULT_LEVELS = "0,20,100,250"
DEFAULT_VARIANTS = ["aug0=0:0", "aug0-20=0:20", "aug100=100:100", "aug250=250:250"]


def _metric_args(p):
    p.add_argument("--dino", default=DEFAULT_DINO, help=f"DINO ViT: hub id in the local cache, folder, or tiny "
                                                         f"(random, meaningless); default {DEFAULT_DINO}")


def add_commands(sub, common_config):
    p = sub.add_parser("evaluate", help="DreamBench metrics (DINO, CLIP-I, CLIP-T, PRES, DIV) for one subject")
    common_config(p)
    p.add_argument("--subject", required=True, help="folder of the subject's real photos (its name picks the class)")
    p.add_argument("--class-noun", default=None, help="default: the dataset's class for the subject folder's name")
    p.add_argument("--identifier", default=None, help="default: the identifier stored in the stage I export")
    p.add_argument("--dataset", default=None, help="DreamBench folder with prompts_and_classes.txt "
                                                   "(default: the copy shipped in the package)")
    p.add_argument("--stage1", default=None, help="stage I to evaluate: fine-tuned export, folder or hub id")
    p.add_argument("--stage2", default=None, help="stage II: export, folder, hub id, or none (score 64px images)")
    p.add_argument("--images", default=None, help="score this folder of pNN-kK.png / class-kK.png images instead")
    p.add_argument("--baseline", action="store_true", help="also the same prompts through the base cascade")
    p.add_argument("--baseline-images", default=None, help="score this folder as the baseline instead")
    p.add_argument("--num-images", type=flags.count(1), default=4, help="images per prompt (paper: 4)")
    p.add_argument("--num-class-images", type=flags.count(1), default=4, help="'a <class>' images for PRES")
    p.add_argument("--max-prompts", type=flags.count(1), default=25, help="first N of the 25 prompts (quick runs)")
    p.add_argument("--chunk", type=flags.count(1), default=5, help="prompts per runner call (resume granularity)")
    p.add_argument("--seed", type=flags.seed, default=0, help="image k of a prompt uses seed + k")
    _metric_args(p)
    p.add_argument("--clip", default=DEFAULT_CLIP, help=f"CLIP model (hub id, folder, or tiny); default {DEFAULT_CLIP}")
    p.add_argument("--lpips-net", default="alex", help="LPIPS backbone for DIV (needs the lpips package)")
    p.add_argument("--output", default=None, help="run folder (kept and resumed if it exists); default runs/NNNNN-eval-SUBJECT")

    p = sub.add_parser("study-sr", help="the super-resolution fine-tuning study: noise level x SR model")
    common_config(p)
    p.add_argument("--subject", required=True, help="folder of the subject's real photos (>= 256px)")
    p.add_argument("--class-noun", required=True, help="the subject's class, e.g. dog")
    p.add_argument("--identifier", default=None, help="default: from the SR exports, else a rare token")
    p.add_argument("--base", default=None, help="base SR model (default: models.stage2's base)")
    p.add_argument("--sr", action="append", default=[], metavar="[LABEL=]PATH", help="fine-tuned SR export (repeatable)")
    p.add_argument("--train", action="store_true", help="fine-tune the --variant SR models first")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=MIN:MAX[:prior]",
                   help="training noise-augmentation range per variant, ':prior' for prior preservation with class "
                        f"pairs made by the frozen cascade (default {' '.join(DEFAULT_VARIANTS)})")
    p.add_argument("--max-steps", type=flags.count(1), default=None, help="training steps per variant (default: config)")
    p.add_argument("--noise-levels", default=DEFAULT_LEVELS, help=f"sampling noise levels (default {DEFAULT_LEVELS})")
    p.add_argument("--stage1", default=None, help="stage I for the sample inputs (default: config), or none")
    p.add_argument("--num-stage1", type=flags.count(0), default=2, help="stage I samples of 'a [V] <class>' to upsample")
    p.add_argument("--max-images", type=flags.count(1), default=4, help="at most this many real photos")
    p.add_argument("--seeds", default="0,1,2", help="seeds, comma-separated: each fine-tunes the variants and samples "
                                                     "once (default 0,1,2: mean ± std over 3)")
    p.add_argument("--holdout", type=flags.count(0), default=None, help="photos kept out of --train and scored as held-out "
                                                             "views (default 1 with >= 4 photos, else 0)")
    p.add_argument("--class-images", type=flags.count(0), default=4, help="base stage I 'a <class>' samples upsampled for drift")
    _metric_args(p)
    p.add_argument("--lpips-net", default="alex", help="LPIPS backbone (alex|vgg|squeeze), when lpips is installed")
    p.add_argument("--output", default=None, help="study folder; default runs/NNNNN-study-sr-CLASS")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output study folder")


def cmd_evaluate(args):
    from cascade.evaluation.dreambench import EvalRequest, run_evaluate

    cfg = load_config(args.config, args.overrides)
    req = EvalRequest(cfg, args.subject, args.class_noun, args.identifier, args.dataset, args.stage1, args.stage2,
                      args.images, args.baseline, args.baseline_images, args.num_images, args.num_class_images,
                      args.max_prompts, args.seed, args.chunk, args.output, args.dino, args.clip, args.lpips_net)
    out = run_evaluate(req)
    if out is not None:
        print((out / "table.md").read_text())
        print(f"tables, JSON and plot in {out}")


def _levels(text: str) -> list[int]:
    try:
        levels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--noise-levels must be integers separated by commas, got {text!r}") from None
    if not levels or any(not 0 <= v <= 999 for v in levels):
        raise ConfigError(f"--noise-levels must be integers in 0..999, got {text!r}")
    return levels


def _variants(items: list[str]) -> list[tuple[str, int, int, bool]]:
    out = []
    for item in items or DEFAULT_VARIANTS:
        name, _, rng = item.partition("=")
        lo, _, rest = rng.partition(":")
        hi, _, flag = rest.partition(":")
        try:
            lo_i, hi_i = int(lo), int(hi or lo)
        except ValueError:
            raise ConfigError(f"--variant {item!r}: expected NAME=MIN:MAX[:prior] with integer levels") from None
        if not name or not 0 <= lo_i <= hi_i <= 999 or flag not in ("", "prior"):
            raise ConfigError(f"--variant {item!r}: expected NAME=MIN:MAX[:prior] with 0 <= MIN <= MAX <= 999")
        out.append((name, lo_i, hi_i, flag == "prior"))
    return out


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        seeds = []
    if not seeds or any(s < 0 for s in seeds):
        raise ConfigError(f"--seeds must be non-negative integers separated by commas, got {text!r}")
    return seeds


def cmd_study_sr(args):
    from cascade.evaluation.sr_study import StudyRequest, run_study

    steps = [] if args.max_steps is None else [f"stage2.train.max_steps={args.max_steps}"]
    cfg = load_config(args.config, args.overrides + steps)
    sr = []
    for item in args.sr:
        label, sep, path = item.partition("=")
        sr.append((label, path) if sep else (f"fine-tuned-{len(sr) + 1}", item))
    if not sr and not args.train:
        raise ConfigError("give fine-tuned SR exports with --sr PATH, or --train to fine-tune variants")
    if args.num_stage1 < 0 or args.max_images < 1 or args.class_images < 0:
        raise ConfigError("--num-stage1 and --class-images must be >= 0 and --max-images >= 1")
    if args.holdout is not None and args.holdout < 0:
        raise ConfigError(f"--holdout must be >= 0, got {args.holdout}")
    seeds = _seeds(args.seeds)
    req = StudyRequest(cfg, args.subject, args.class_noun, args.identifier, args.base, sr,
                       _variants(args.variant) if args.train else [], _levels(args.noise_levels), args.stage1,
                       args.num_stage1, args.max_images, seeds[0], args.dino, args.lpips_net, args.output,
                       args.overwrite, seeds=seeds, holdout=args.holdout, class_stage1=args.class_images)
    if (args.base or cfg.models.stage2) == "toy":  # the toy world: its exact readers see the SR detail
        from cascade.toy.measure import study_extras

        study_extras(req)
    out, _ = run_study(req)
    print((out / "table.md").read_text())
    print(f"CSV, table, plots and grids in {out}")


COMMANDS = {"evaluate": cmd_evaluate, "study-sr": cmd_study_sr}
