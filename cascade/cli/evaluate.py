"""`cascade evaluate` (DreamBench metrics) and `cascade study-sr` (the super-resolution study):
argument parsing and the calls into cascade.evaluation.dreambench / cascade.evaluation.sr_study."""
from __future__ import annotations

from cascade.cli import flags
from cascade.config import ConfigError, given_keys, load_config
from cascade.evaluation.metrics import DEFAULT_CLIP, DEFAULT_DINO


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
                        "pairs made by the frozen cascade (default: the config's study.variants)")
    p.add_argument("--max-steps", type=flags.count(1), default=None,
                   help="training steps per variant (default: study.max_steps, else stage2.train.max_steps)")
    p.add_argument("--noise-levels", default=None, help="sampling noise levels, comma-separated (default: study.noise_levels)")
    p.add_argument("--stage1", default=None, help="stage I for the sample inputs (default: config), or none")
    p.add_argument("--num-stage1", type=flags.count(0), default=None,
                   help="stage I samples of 'a [V] <class>' to upsample (default: study.num_stage1)")
    p.add_argument("--max-images", type=flags.count(1), default=None, help="at most this many real photos "
                                                                            "(default: study.max_images)")
    p.add_argument("--seeds", default=None, help="seeds, comma-separated: each fine-tunes the variants and samples once "
                                                 "(default: study.seeds, 0,1,2 in every preset: mean ± std over 3)")
    p.add_argument("--holdout", type=flags.count(0), default=None, help="photos kept out of --train and scored as held-out "
                                                             "views (default 1 with >= 4 photos, else 0)")
    p.add_argument("--class-images", type=flags.count(0), default=None,
                   help="base stage I 'a <class>' samples upsampled for drift (default: study.class_images)")
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


def _grid(parse, flag: str, key: str, value):
    """Parse one grid setting, naming the flag or the config key at fault."""
    try:
        return parse(value)
    except ValueError as e:
        raise ConfigError(f"{flag}: {e}" if flag else f"config 'study.{key}': {e}") from None


def cmd_study_sr(args):
    from cascade import study_grid
    from cascade.evaluation.sr_study import StudyRequest, run_study

    cfg = load_config(args.config, args.overrides)
    st = cfg.study
    settings = study_grid.steps(cfg, given_keys(args.config, args.overrides), {"--max-steps": args.max_steps})
    sr = []
    for item in args.sr:
        label, sep, path = item.partition("=")
        sr.append((label, path) if sep else (f"fine-tuned-{len(sr) + 1}", item))
    if not sr and not args.train:
        raise ConfigError("give fine-tuned SR exports with --sr PATH, or --train to fine-tune variants")
    seeds = _grid(study_grid.seeds, args.seeds and "--seeds", "seeds", args.seeds or st.seeds)
    levels = _grid(study_grid.levels, args.noise_levels and "--noise-levels", "noise_levels",
                   args.noise_levels or st.noise_levels)
    variants = _grid(study_grid.variants, args.variant and "--variant", "variants",
                     args.variant or st.variants.split()) if args.train else []
    pick = lambda flag, preset: preset if flag is None else flag  # noqa: E731 (0 is a value here)
    req = StudyRequest(cfg, args.subject, args.class_noun, args.identifier, args.base, sr, variants, levels,
                       args.stage1, pick(args.num_stage1, st.num_stage1), pick(args.max_images, st.max_images),
                       seeds[0], args.dino, args.lpips_net, args.output, args.overwrite, seeds=seeds,
                       holdout=args.holdout, class_stage1=pick(args.class_images, st.class_images), settings=settings)
    if (args.base or cfg.models.stage2) == "toy":  # the toy world: its exact readers see the SR detail
        from cascade.toy.measure import study_extras

        study_extras(req)
    out, _ = run_study(req)
    print((out / "table.md").read_text())
    print(f"CSV, table, plots and grids in {out}")


COMMANDS = {"evaluate": cmd_evaluate, "study-sr": cmd_study_sr}
