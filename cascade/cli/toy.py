"""`cascade toy ...`: the toy world's commands (pretrain; check measures the readers' bars)."""
from __future__ import annotations

import logging
from dataclasses import fields
from pathlib import Path

from cascade.cli import flags


PRETRAIN_HELP = {
    "stage": "which stage to train: 1 (16 px base) or 2 (16 -> 64 super-resolution)",
    "steps": "optimizer steps in all (a resumed run continues up to it)",
    "batch_size": "images per step",
    "learning_rate": "AdamW peak learning rate",
    "warmup_steps": "linear warm-up steps",
    "ema_decay": "decay of the exported EMA weights",
    "grad_clip": "gradient-norm clipping (0: off)",
    "caption_dropout": "fraction of empty captions (for classifier-free guidance)",
    "attribute_dropout": "chance each attribute is left out of a caption",
    "noise_level_max": "stage II: augmentation levels drawn from 0..this",
    "crop": "stage II: random crop size (0: whole images)",
    "pool_size": "generated (image, caption) pairs drawn from",
    "seed": "seed of the world, the weights and every step",
    "ckpt_every": "checkpoint and export every N steps",
    "threads": "torch CPU threads (1 is fastest on a shared machine)",
    "specks": "stage II: fraction of pool images with freckle-like dots on the background",
    "init": "start from this diffusers unet/ folder (e.g. cascade/toy/weights/stage2/unet); recorded in provenance",
    "toy_specks": "stage II: the speck images also get 1..6 dots on the toy",
    "speck_weight": "stage II: extra squared-error weight on the pixels within --speck-radius px of each dot",
    "speck_radius": "stage II: radius (64 px units) of the --speck-weight region around each dot",
    "speck_max_level": "stage II: --speck-weight only on examples augmented at most to this level",
    "marks": "stage II: fraction of pool toys with 1-2 marks of the subject glyph's kind (never the glyph)",
    "low_levels": "stage II: fraction of examples augmented at levels 0..20 only (where faint marks show)",
    "high_t": "fraction of examples drawn at timesteps in the upper half (where the condition says the most)",
}
# each pretraining value's range, checked as the flag is parsed
PRETRAIN_TYPES = {
    "stage": flags.number(int, 1, 2), "steps": flags.count(1), "batch_size": flags.count(1),
    "learning_rate": flags.finite(0, low_open=True), "warmup_steps": flags.count(0),
    "ema_decay": flags.finite(0, 1, high_open=True), "grad_clip": flags.finite(0),
    "caption_dropout": flags.finite(0, 1), "attribute_dropout": flags.finite(0, 1),
    "noise_level_max": flags.noise_level, "crop": flags.count(0), "pool_size": flags.count(1),
    "seed": flags.seed, "ckpt_every": flags.count(1), "threads": flags.count(1),
    "specks": flags.finite(0, 1), "init": str, "toy_specks": flags.boolean, "speck_weight": flags.finite(0),
    "speck_radius": flags.finite(0), "speck_max_level": flags.noise_level, "marks": flags.finite(0, 1),
    "low_levels": flags.finite(0, 1), "high_t": flags.finite(0, 1),
}


def add_commands(sub):
    toy = sub.add_parser("toy", help="the toy world: pretrain its cascade, measure it").add_subparsers(
        dest="toy_command", required=True)
    from cascade.toy.pretrain import PretrainConfig

    p = toy.add_parser("pretrain", help="train one stage of the toy cascade (deterministic, resumable)")
    p.add_argument("--output", required=True, help="run folder: model/ (diffusers layout), checkpoints, logs")
    p.add_argument("--resume", action="store_true", help="continue from the stage's checkpoint in --output")
    for f in fields(PretrainConfig):
        p.add_argument("--" + f.name.replace("_", "-"), type=PRETRAIN_TYPES[f.name], default=f.default,
                       help=f"{PRETRAIN_HELP[f.name]} (default {f.default})")
    p.set_defaults(func=cmd_pretrain)
    add_check(toy)
    add_premise(toy)
    add_install(toy)
    add_study(toy)


def cmd_pretrain(args):
    from cascade.toy.pretrain import PretrainConfig, pretrain

    cfg = PretrainConfig(**{f.name: getattr(args, f.name) for f in fields(PretrainConfig)})
    if cfg.stage not in (1, 2):
        from stages.errors import InputError

        raise InputError(f"--stage must be 1 or 2, got {cfg.stage}")
    if cfg.crop % 8:
        from stages.errors import InputError

        raise InputError(f"--crop {cfg.crop}: the stage II UNet halves the size 3 times; give 0 (whole images) or "
                         f"a multiple of 8")
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(out / f"stage{cfg.stage}.log", encoding="utf-8", errors="backslashreplace")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logging.getLogger("cascade").addHandler(handler)
    logging.getLogger("cascade").setLevel(logging.INFO)
    losses = pretrain(out, cfg, resume=args.resume)
    if losses:
        print(f"stage {cfg.stage}: {len(losses)} steps, loss {losses[0]:.4f} -> {sum(losses[-20:]) / min(20, len(losses)):.4f}; "
              f"EMA weights in {out / 'model' / f'stage{cfg.stage}'}")


def add_check(toy):
    p = toy.add_parser("check", help="measure the toy cascade's bars with the readers (stage I and II accuracy)")
    p.add_argument("--model", default=None, help="folder with stage1/ and stage2/; default: the committed weights")
    p.add_argument("--stage", type=int, choices=[0, 1, 2], default=0, help="0 (default): both stages")
    p.add_argument("--num", type=flags.count(1), default=128, help="samples per stage to read")
    p.add_argument("--steps", type=flags.count(1), default=50, help="sampling steps of both stages")
    p.add_argument("--guidance", type=flags.finite(0), default=4.0, help="classifier-free guidance scale")
    p.add_argument("--noise-level", type=flags.noise_level, default=100,
                   help="stage II sampling noise-augmentation level")
    p.add_argument("--seed", type=flags.seed, default=0, help="seed of the generator images and the samplers")
    p.add_argument("--threads", type=flags.count(1), default=1, help="torch CPU threads (1 is fastest on a shared machine)")
    p.add_argument("--cache-dir", default="~/.cache/cascade", help="text-embedding cache")
    p.add_argument("--grid", default=None, help="write sample grids (PNG) with this path prefix")
    p.set_defaults(func=cmd_check)


def cmd_check(args):
    import json

    import torch

    from cascade.toy import check, readers
    from stages.data import grid

    torch.set_num_threads(args.threads)
    if args.model:
        root = Path(args.model)
        if not (root / "stage1" / "model_index.json").is_file():
            from stages.errors import InputError

            raise InputError(f"--model {root}: no stage1/model_index.json there")
    else:
        from cascade.toy.weights import toy_root

        root = toy_root()
    kw = dict(n=args.num, steps=args.steps, guidance=args.guidance, seed=args.seed, cache_dir=args.cache_dir)
    r1 = check.check_stage1(root, **kw) if args.stage in (0, 1) else None
    r2 = check.check_stage2(root, noise_level=args.noise_level, **kw) if args.stage in (0, 2) else None
    print(check.report(r1, r2))
    for name, r in (("stage1", r1), ("stage2", r2)):
        if r and args.grid:
            size = 4 * r["images"].shape[-1] if name == "stage1" else r["images"].shape[-1]
            grid([readers.to_pil(im).resize((size, size), 0) for im in r["images"][:64]], 8).save(
                f"{args.grid}-{name}.png")
    print(json.dumps({k: v for r in (r1, r2) if r for k, v in r.items() if not hasattr(v, "shape")}))


def add_premise(toy):
    p = toy.add_parser("premise", help="can any SR model place the subject's freckles? the oracle on IF's noised "
                                       "condition, per sampling noise level")
    p.add_argument("--views", type=flags.count(1), default=32, help="fresh subject views (default 32)")
    p.add_argument("--seeds", type=flags.count(1), default=3, help="noise draws per level (default 3)")
    p.add_argument("--levels", default="0,5,20,50,100,250,500", help="noise levels")
    p.add_argument("--sr", default=None, help="also run this stage II (folder, e.g. cascade/toy/weights/stage2) on "
                                              "--views fresh pool toys with background specks: can it draw them?")
    p.add_argument("--sr-steps", type=flags.count(1), default=10, help="SR sampling steps for --sr (default 10)")
    p.set_defaults(func=cmd_premise)


def cmd_premise(args):
    import statistics

    from diffusers import DDPMScheduler

    from cascade.toy import freckles, weights, world
    from stages.errors import InputError

    try:
        levels = [int(x) for x in args.levels.split(",")]
    except ValueError:
        raise InputError(f"--levels must be comma-separated integers, got {args.levels!r}") from None
    if args.views < 1 or args.seeds < 1 or any(not 0 <= lv <= 999 for lv in levels):
        raise InputError("--views and --seeds must be >= 1, --levels in 0..999")
    if args.sr:
        _check_premise_sr(args.sr)
    noising = DDPMScheduler.from_pretrained(weights.WEIGHTS / "stage2" / "image_noising_scheduler")
    toys = world.fresh_subject_toys(args.views, 0)
    print(f"oracle freckle F1 on {args.views} fresh subject views x {args.seeds} noise draws "
          f"(mean ± std over views and draws); noise std = sqrt(1 - alpha_bar(level))")
    print("| noise level | noise std | oracle F1 |\n|---|---|---|")
    for lv in levels:
        v = [x for s in range(args.seeds) for x in freckles.oracle(toys, lv, noising, seed=s)]
        std = float((1 - noising.alphas_cumprod[lv]).sqrt())
        print(f"| {lv} | {std:.4f} | {statistics.mean(v):.3f} ± {statistics.pstdev(v):.3f} |")
    chance = [x for s in range(args.seeds) for x in freckles.chance(toys, seed=s)]
    print(f"| chance (dots at random light-stripe positions inside the toy) | - | {statistics.mean(chance):.3f} ± "
          f"{statistics.pstdev(chance):.3f} |")
    if args.sr:
        from diffusers import IFSuperResolutionPipeline

        from cascade.toy.check import _embeds

        sr = Path(args.sr)
        text = sr.parent / "stage1" if (sr.parent / "stage1" / "text_encoder").is_dir() else weights.WEIGHTS / "stage1"
        embed = lambda prompts: _embeds(text, prompts, "~/.cache/cascade")  # noqa: E731
        pipe = IFSuperResolutionPipeline.from_pretrained(sr, safety_checker=None, watermarker=None,
                                                         feature_extractor=None, requires_safety_checker=False)
        sens = freckles.condition_sensitivity(pipe.unet, pipe.scheduler, pipe.image_noising_scheduler, embed,
                                              args.views)
        print(f"\nSR {args.sr}: does it read a faint dot in its condition? change of its x0 estimate at the specks "
              f"when only the level-0 condition shows them ({args.views} pool-like toys; copying the condition: "
              f"{sens.pop('condition'):+.4f})")
        print("| timestep | x0 change at the specks |\n|---|---|")
        for t, v in sens.items():
            print(f"| {t} | {v:+.4f} |")

        reads = freckles.speck_control(pipe, args.views, levels, args.sr_steps, embed)
        for kind, what in (("specks", "pool-like toys with background specks: speck F1 on the background"),
                           ("subject", "fresh subject views (its full caption): freckle F1 on the toy")):
            print(f"\nSR {args.sr} on {args.views} {what} ({args.sr_steps} steps, guidance 4; mean ± std over images)")
            print("| noise level | F1 | dots drawn | bilinear F1 |\n|---|---|---|---|")
            for lv, r in reads[kind].items():
                print(f"| {lv} | {r['f1']:.3f} ± {r['f1_std']:.3f} | {r['found']:.2f} (true {r['true']:.2f}) | "
                      f"{r['bilinear_f1']:.3f} |")


def _check_premise_sr(sr: str):
    """`toy premise --sr`: a stage II pipeline folder that upsamples the toy world's 16 px images to its
    64 px ones (the check `cascade sample` makes of a cascade), before anything runs."""
    from cascade import resolutions
    from cascade.toy import weights, world
    from stages.errors import InputError

    if not (Path(sr) / "model_index.json").is_file():
        raise InputError(f"--sr {sr}: not a stage II pipeline folder (no model_index.json there), e.g. "
                         f"{weights.WEIGHTS / 'stage2'}")
    low, high = resolutions.check_cascade(str(weights.WEIGHTS / "stage1"), sr)
    if high != world.HI:
        raise InputError(f"--sr {sr} makes {high}px images from the toy world's {low}px ones; the premise reads "
                         f"freckles at {world.HI}px: give a stage II of the toy cascade ({low} -> {world.HI} px)")


def add_install(toy):
    p = toy.add_parser("install", help="install a pretraining's model/ as toy weights, after the toy check bars")
    p.add_argument("--model", required=True, help="the pretraining's model/ folder (stage1/, stage2/)")
    p.add_argument("--dest", default=None, help="new folder to install into (default runs/NNNNN-toy-weights); use "
                                                "it as --model of toy check or models.stage1: DEST/stage1")
    p.add_argument("--replace-packaged", action="store_true",
                   help="replace the committed weights (cascade/toy/weights) and their SHA256SUMS (maintainers)")
    p.add_argument("--num", type=int, default=128, help="samples per stage the bars are measured on (default 128)")
    p.add_argument("--steps", type=int, default=50, help="sampling steps of the bar check (default 50)")
    p.add_argument("--cache-dir", default="~/.cache/cascade", help="text-embedding cache")
    p.set_defaults(func=cmd_install)


def cmd_install(args):
    import json

    from cascade.runs import folders, markers
    from cascade.toy import check, weights
    from stages.errors import InputError

    model = Path(args.model)
    prov = {}
    for s in ("stage1", "stage2"):
        if not (model / s / "model_index.json").is_file():
            raise InputError(f"--model {model}: no {s}/model_index.json there")
        info = model.parent / f"{s}.json"
        prov[s] = json.loads(info.read_text()) if info.is_file() else {}
    if args.num < 1 or args.steps < 1:
        raise InputError("--num and --steps must be >= 1")
    if args.replace_packaged and args.dest:
        raise InputError("--dest and --replace-packaged exclude each other")
    dest = weights.WEIGHTS if args.replace_packaged else Path(args.dest) if args.dest else \
        folders.next_run_dir(folders.RUNS_DIR, "toy-weights")
    if not args.replace_packaged:
        if markers.inside(dest, weights.WEIGHTS) or markers.inside(weights.WEIGHTS, dest):
            raise InputError(f"--dest {dest} is (or holds) the committed toy weights; pass --replace-packaged to "
                             f"replace them")
        if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
            raise InputError(f"--dest {dest} exists and is not empty; choose a new folder")
    if markers.inside(model, dest) or markers.inside(dest, model):
        raise InputError(f"--dest {dest} and --model {model} overlap; choose a folder outside the model")
    kw = dict(n=args.num, steps=args.steps, cache_dir=args.cache_dir)
    r1, r2 = check.check_stage1(model, **kw), check.check_stage2(model, **kw)
    print(check.report(r1, r2))
    below = check.below_bars(r1, r2)
    if below:
        raise InputError(f"--model {model} is below the toy check bars ({'; '.join(below)}); not installed")
    digest = weights.install(model, prov, dest)
    print(f"installed {model} into {dest}; sha256 of SHA256SUMS: {digest}")


def add_study(toy):
    p = toy.add_parser("study", help="the paper's three claims on the toy cascade, several seeds, read exactly")
    p.add_argument("--output", required=True, help="run folder: results.csv, table.md, plots.png, grids")
    p.add_argument("--overwrite", action="store_true", help="replace an existing toy study folder")
    p.add_argument("--seeds", default="0,1,2", help="fine-tuning seeds, comma-separated (>= 3 for a spread)")
    p.add_argument("--samples", type=flags.count(1), default=16, help="stage I samples per prompt and model")
    p.add_argument("--stage1-steps", type=flags.count(1), default=100,
                   help="stage I fine-tuning steps per run (default 100)")
    p.add_argument("--stage2-steps", type=flags.count(1), default=100,
                   help="stage II fine-tuning steps per run (default 100)")
    p.add_argument("--levels", default="0,20,500", help="SR sampling noise levels (500: the glyph oracle's floor)")
    p.add_argument("--sr-inputs", type=flags.count(1), default=2, help="stage I samples upsampled per SR model and level")
    p.add_argument("--sr-steps", type=flags.count(1), default=10, help="SR sampling steps in the sweep (default 10)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=MIN:MAX[:prior]",
                   help="SR variants, training augmentation low/mid/high (default aug0=0:0 aug250=250:250 aug500=500:500)")
    p.add_argument("--sr-only", action="store_true", help="claim (c) only (skips the stage I claims a and b)")
    p.add_argument("--threads", type=flags.count(1), default=1, help="torch CPU threads (1 is fastest on a shared machine)")
    p.add_argument("--cache-dir", default="~/.cache/cascade", help="text-embedding cache")
    p.set_defaults(func=cmd_study)


def cmd_study(args):
    import torch

    from stages.errors import InputError

    try:
        seeds = [int(x) for x in args.seeds.split(",")]
        levels = [int(x) for x in args.levels.split(",")]
    except ValueError:
        raise InputError(f"--seeds/--levels must be comma-separated integers, got {args.seeds!r} / {args.levels!r}")
    if not seeds or args.samples < 1 or args.sr_inputs < 1 or args.sr_steps < 1 or any(not 0 <= lv <= 999
                                                                                         for lv in levels):
        raise InputError("--seeds needs one seed or more, --samples/--sr-inputs/--sr-steps >= 1, --levels in 0..999")
    from cascade.toy.study import StudyConfig, run_study

    from cascade.runs import folders

    torch.set_num_threads(args.threads)
    sc = StudyConfig(seeds, args.samples, args.stage1_steps, args.stage2_steps, levels=levels, sr_inputs=args.sr_inputs,
                     sr_steps=args.sr_steps, sr_only=args.sr_only)
    if args.variant:
        from cascade import study_grid

        try:
            sc.variants = study_grid.variants(args.variant)
        except ValueError as e:
            raise InputError(f"--variant {e}") from None
    out = folders.prepare_output(args.output, "toy study", overwrite=args.overwrite)  # the run-folder rules
    run_study(out, sc, args.cache_dir)
    print((out / "table.md").read_text())
    print(f"results: {out / 'results.csv'}, plots: {out / 'plots.png'}; the SR sweep over all seeds (per-seed CSV, "
          f"tables, plots, grids): {out}/study-sr")
