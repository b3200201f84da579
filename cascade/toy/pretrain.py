"""`cascade toy pretrain`: teach the toy cascade its world, on CPU, deterministically and resumably.

Recipe (measured in issue 8 and here): AdamW lr 1e-3 with 200 warm-up steps, batch 64, gradient
clipping 1.0, EMA 0.999 for the exported weights, 10% empty captions (classifier-free guidance),
each caption attribute dropped with p 0.25 (so "a toy" means any toy), the project's hybrid loss
(learned variance). Stage II sees the low-res view through stages/noise_aug.py at levels 0..250.
All randomness of step k comes from (seed, k), so a resumed run continues exactly; checkpoints
(weights, EMA, optimizer) and the exported EMA UNets are written atomically every `ckpt_every` steps.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from cascade.toy import build, world
from stages import noise_aug
from stages.checkpoint import safe_load
from stages.errors import InputError
from stages.losses import DiffusionMath, diffusion_loss
from stages.trainer import step_generator

log = logging.getLogger(__name__)


LOW_LEVEL_MAX = 20  # the study's low levels (0, 20): where the condition shows the glyph (gate 1)


@dataclass
class PretrainConfig:
    stage: int = 1
    steps: int = 3000
    batch_size: int = 32
    learning_rate: float = 1e-3
    warmup_steps: int = 200
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    caption_dropout: float = 0.1
    attribute_dropout: float = 0.25
    noise_level_max: int = 250
    crop: int = 32  # stage II trains on random crops of this size (0: whole 64 px images); 4x cheaper
    pool_size: int = 4000
    seed: int = 0
    ckpt_every: int = 100
    threads: int = 1
    specks: float = 0.0  # stage II: fraction of pool images with freckle-like dots on the background
    init: str = ""  # start from this diffusers unet/ folder (e.g. the committed stage II) instead of random
    toy_specks: bool = False  # stage II: speck images also get 1..6 dots on the toy (random light-stripe rows)
    speck_weight: float = 0.0  # stage II: extra squared-error weight within speck_radius px of each dot ...
    speck_radius: float = 4.5  # ... (the region the dot's 16 px dip tells apart from its surroundings) ...
    speck_max_level: int = 50  # ... for examples augmented at most to this level (where the condition shows the dot)
    marks: float = 0.0  # stage II: fraction of pool toys with 1-2 marks of the glyph's kind (glyph.with_marks)
    low_levels: float = 0.0  # stage II: fraction of examples augmented at levels 0..LOW_LEVEL_MAX only
    high_t: float = 0.0  # fraction of examples at timesteps T/2..T-1 (where x_t says little and the condition most)


def speck_weights(toys, radius: float) -> torch.Tensor:
    """[N, 1, 64, 64] uint8: 1 within `radius` px of each toy's specks, freckles and marks' centres. The dots are a small
    part of an image's squared error, too little for the small SR to learn to place them from its
    condition; this map lets the loss weigh them more. It must stay a function of what the model sees, or
    the optimum moves (weighing exactly the dots' pixels, which it cannot see, taught it to draw four
    times too many dots): so the default region is as wide as the dot's 16 px dip, used only at
    augmentation levels where the condition shows that dip. Neither taught the toy SR to place the
    dots in the runs measured (docs/toy-world.md); the options stay for the next recipe."""
    yy, xx = torch.meshgrid(torch.arange(world.HI) + 0.5, torch.arange(world.HI) + 0.5, indexing="ij")
    out = torch.zeros(len(toys), 1, world.HI, world.HI, dtype=torch.uint8)
    for i, t in enumerate(toys):
        for x, y, *_ in (*t.specks, *t.freckles, *t.marks):
            out[i, 0][(xx - x) ** 2 + (yy - y) ** 2 <= radius ** 2] = 1
    return out


def prepare(out: Path, seed: int) -> dict[str, torch.Tensor]:
    """Write model/stage1 (tokenizer, T5, random UNet) and model/stage2 once; return the
    embedding of every grammar caption and of "" ([77, D] each), cached in out/embeds.pt."""
    from cascade.text import TextEncoder

    emb_file = out / "embeds.pt"
    if emb_file.is_file():
        return safe_load(emb_file, "embedding cache")
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".model-", dir=out))
    try:
        torch.manual_seed(seed)
        tok = build.build_tokenizer(tmp / "tokenizer-src")
        from cascade.offline.tiny import build_text_encoder

        text_encoder = build_text_encoder(len(tok))
        build.save_stage1(tmp / "stage1", tok, text_encoder, build.stage1_unet())
        build.save_stage2(tmp / "stage2", build.stage2_unet())
        shutil.rmtree(tmp / "tokenizer-src")
        if (out / "model").exists():
            shutil.rmtree(out / "model")  # a half-prepared folder of our own (embeds.pt missing)
        os.replace(tmp, out / "model")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    enc = TextEncoder(str(out / "model" / "stage1"), out / "cache", device="cpu")
    prompts = world.all_captions() + [""]
    embeds = {p: e[0] for p, e in enc.encode(prompts).items()}
    torch.save(embeds, out / "embeds.tmp")
    os.replace(out / "embeds.tmp", emb_file)
    return embeds


def make_batch(cfg: PretrainConfig, toys, pool: torch.Tensor, embeds, gen: torch.Generator):
    """x0 at the stage's resolution, the 16 px view (stage II), caption embeddings and the indices."""
    idx = torch.randint(0, len(toys), (cfg.batch_size,), generator=gen)
    rng = random.Random(int(torch.randint(0, 2**31, (1,), generator=gen)))
    caps = ["" if rng.random() < cfg.caption_dropout else world.training_caption(toys[i], rng, cfg.attribute_dropout)
            for i in idx.tolist()]
    hi = pool[idx].float() / 127.5 - 1.0
    enc = torch.stack([embeds[c] for c in caps])
    return hi, world.to_lowres(hi), enc, idx


def _crop(x0: torch.Tensor, cond: torch.Tensor, size: int, gen: torch.Generator, extra: torch.Tensor | None = None):
    """The same random crop of the 64 px target, of its (already upsampled, noised) condition and of
    `extra` (a per-pixel weight map, or None)."""
    if not size or size >= x0.shape[-1]:
        return x0, cond, extra
    parts = [x0, cond] + ([] if extra is None else [extra.to(x0.dtype)])
    both = torch.cat(parts, dim=1)
    tops = torch.randint(0, x0.shape[-1] - size + 1, (x0.shape[0],), generator=gen).tolist()
    lefts = torch.randint(0, x0.shape[-1] - size + 1, (x0.shape[0],), generator=gen).tolist()
    both = torch.stack([b[:, t:t + size, l:l + size] for b, t, l in zip(both, tops, lefts)])
    return both[:, :3], both[:, 3:6], (None if extra is None else both[:, 6:])


def _save_atomic(obj, path: Path):
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def export_unet(unet, folder: Path):
    """Replace folder (a diffusers `unet/` subfolder) with `unet`'s weights, atomically."""
    tmp = Path(tempfile.mkdtemp(prefix=".unet-", dir=folder.parent))
    unet.save_pretrained(tmp)
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def init_unet(unet, folder: Path):
    """Load the weights of the diffusers unet/ folder `folder` into `unet` (same architecture; fp16 weights
    are upcast), so pretraining continues from them."""
    from safetensors.torch import load_file

    f = folder / "diffusion_pytorch_model.safetensors"
    if not f.is_file():
        raise InputError(f"--init {folder}: no diffusion_pytorch_model.safetensors there")
    state = {k: v.float() for k, v in load_file(f).items()}
    mine = unet.state_dict()
    if set(state) != set(mine) or any(state[k].shape != mine[k].shape for k in mine):
        raise InputError(f"--init {folder}: its UNet does not have this stage's architecture")
    unet.load_state_dict(state)
    log.info("initialised from %s", folder)


def _weighted_error(math_, out_, x0, noise, t, wmap, sched_config) -> torch.Tensor:
    """[B]: the squared error of the prediction (epsilon or v, as the stage's scheduler says) within the
    speck map `wmap`, per pixel of the image (so weight w adds w x the dots' share of the plain MSE)."""
    target = noise if sched_config.prediction_type == "epsilon" else math_.v_target(x0, noise, t)
    return ((out_[:, :3].float() - target.float()).pow(2) * wmap).mean(dim=(1, 2, 3))


def pretrain(out: Path, cfg: PretrainConfig, resume: bool = False, progress: bool = True) -> list[float]:
    """Train one stage; returns the per-step losses of this invocation."""
    from diffusers import UNet2DConditionModel

    out = Path(out)
    ckpt = out / f"ckpt-stage{cfg.stage}.pt"
    if ckpt.exists() and not resume:
        raise InputError(f"{ckpt} exists; pass --resume to continue it or choose another --output")
    torch.set_num_threads(cfg.threads)
    embeds = prepare(out, cfg.seed)
    stage_dir = out / "model" / f"stage{cfg.stage}"
    unet = UNet2DConditionModel.from_pretrained(stage_dir / "unet")
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_pretrained(stage_dir / "scheduler")
    math_ = DiffusionMath(scheduler.alphas_cumprod)
    noising = DDPMScheduler.from_pretrained(out / "model" / "stage2" / "image_noising_scheduler")
    if cfg.init:
        init_unet(unet, Path(cfg.init))
    ema = copy.deepcopy(unet).requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.learning_rate, weight_decay=0.0)
    start, losses_all = 0, []
    if resume and ckpt.exists():
        state = safe_load(ckpt, "--resume: checkpoint")
        defaults = asdict(PretrainConfig())  # a key added since the checkpoint was made had its default then
        made = {**defaults, **state["config"]}
        if made != asdict(cfg):
            changed = {k for k in asdict(cfg) if made.get(k) != asdict(cfg)[k]} - {"steps", "threads", "ckpt_every"}
            if changed:
                raise InputError(f"{ckpt} was made with other settings ({', '.join(sorted(changed))}); "
                                 "resume with the same options")
        unet.load_state_dict(state["unet"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        start, losses_all = state["step"], state["losses"]
        log.info("resumed stage %d at step %d", cfg.stage, start)
    toys, hi = world.dataset(cfg.pool_size, cfg.seed + 1, specks=cfg.specks, toy_specks=cfg.toy_specks)
    if cfg.marks > 0:
        from cascade.toy import glyph

        toys = glyph.with_marks(toys, cfg.seed + 1, cfg.marks)
        marked = [i for i, t in enumerate(toys) if t.marks]
        hi[marked] = world.to_tensor([world.render(toys[i]) for i in marked])
    pool = ((hi + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    del hi
    wpool = speck_weights(toys, cfg.speck_radius) if cfg.speck_weight > 0 else None
    unet.train()
    log.info("stage %d: %d params, %s", cfg.stage, sum(p.numel() for p in unet.parameters()), asdict(cfg))
    from tqdm.auto import tqdm

    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=f"toy stage {cfg.stage}",
               disable=not progress, mininterval=5)
    losses, t0 = [], time.time()
    for step in bar:
        gen = step_generator(cfg.seed, step, cfg.stage)
        hi, lo, enc, idx = make_batch(cfg, toys, pool, embeds, gen)
        x0, cond, class_labels, wmap = lo, None, None, None
        if cfg.stage == 2:
            levels = torch.randint(0, cfg.noise_level_max + 1, (hi.shape[0],), generator=gen)
            if cfg.low_levels > 0:  # reading a faint mark is learned where the condition shows it
                low = torch.rand(hi.shape[0], generator=gen) < cfg.low_levels
                levels = torch.where(low, torch.randint(0, LOW_LEVEL_MAX + 1, levels.shape, generator=gen), levels)
            cond = noise_aug.noised_condition(lo, world.HI, levels, noising, generator=gen)
            wmap = None if wpool is None else wpool[idx] * (levels <= cfg.speck_max_level).view(-1, 1, 1, 1)
            x0, cond, wmap = _crop(hi, cond, cfg.crop, gen, wmap)
            class_labels = levels
        noise = torch.randn(x0.shape, generator=gen)
        n_t = scheduler.config.num_train_timesteps
        t = torch.randint(0, n_t, (x0.shape[0],), generator=gen)
        if cfg.high_t > 0:  # the same optimum, more of the gradient where reading the condition is all there is
            high = torch.rand(x0.shape[0], generator=gen) < cfg.high_t
            t = torch.where(high, torch.randint(n_t // 2, n_t, t.shape, generator=gen), t)
        xt = math_.q_sample(x0, noise, t)
        inp = xt if cond is None else noise_aug.model_input(xt, cond)
        for g in opt.param_groups:
            g["lr"] = cfg.learning_rate * min(1.0, (step + 1) / cfg.warmup_steps)
        out_ = unet(inp, t, encoder_hidden_states=enc, class_labels=class_labels, return_dict=False)[0]
        loss = diffusion_loss(math_, out_, x0, xt, noise, t, "hybrid", 1.0, scheduler.config.prediction_type)
        if wmap is not None:
            loss = loss + cfg.speck_weight * _weighted_error(math_, out_, x0, noise, t, wmap, scheduler.config)
        loss = loss.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), cfg.grad_clip)
        opt.step()
        with torch.no_grad():
            d = min(cfg.ema_decay, (1 + step) / (10 + step))
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.mul_(d).add_(p.detach(), alpha=1 - d)
        losses.append(loss.item())
        losses_all.append(loss.item())
        done = step + 1
        if done % 20 == 0:
            recent = sum(losses_all[-20:]) / 20
            bar.set_postfix(loss=f"{recent:.4f}")
            log.info("stage %d step %d loss %.4f (%.2f steps/s)", cfg.stage, done, recent,
                     len(losses) / (time.time() - t0))
        if done % cfg.ckpt_every == 0 or done == cfg.steps:
            _save_atomic({"step": done, "unet": unet.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                          "losses": losses_all, "config": asdict(cfg)}, ckpt)
            export_unet(ema, stage_dir / "unet")
            info = {"step": done, "config": asdict(cfg)}
            if cfg.init:  # the starting weights by content: a path alone may later hold other weights
                from cascade.toy.weights import sha256

                info["init_sha256"] = sha256(Path(cfg.init) / "diffusion_pytorch_model.safetensors")
            (out / f"stage{cfg.stage}.json").write_text(json.dumps(info))
    return losses
