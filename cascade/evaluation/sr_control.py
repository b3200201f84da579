"""The SR study's positive control: can this SR model show a noise-augmentation effect at all?

An SR model that never reads the fine detail of its condition cannot care how noisy the condition
was, in training or in sampling, so "no difference between augmentations" from it says nothing about
the paper's claim (issue 28). Two measures, for any SR model and resolution, on the user's own photos:

- **condition read** (`condition_read`): faint synthetic marks (single low-res pixels darkened by
  `MARK`) are added to the condition at level 0; x_t is made from the photo without them, so only the
  condition shows them. The share of the condition's change at the marks that reaches the model's x0
  estimate, per timestep: 1 = copies its condition there, 0 = does not see it.
- **sampling-level effect** (`level_effect`): the same model, inputs and sampling noise at the
  study's lowest and highest sampling level; 1 - the high-pass correlation of the two outputs. A model
  whose output does not depend on its condition's detail places detail the same way at both (0).

A model below both bars is reported as "cannot show a noise effect", never as "no effect".
"""
from __future__ import annotations

import random

import torch

from stages.losses import DiffusionMath
from stages.noise_aug import model_input, noised_condition

MARK = -0.3  # the mark: one low-res pixel this much darker (on [-1, 1]); 15 % of the range
MARKS = 4  # per image
TIMESTEPS = (300, 500, 999)
READ_BAR = 0.25  # share of a copy's change the x0 estimate must show at some timestep
LEVEL_BAR = 0.25  # 1 - high-pass correlation of the low- and high-level outputs (docs/sr-study.md: why not lower)
CANNOT = "cannot show a noise effect"
MIN_ALPHA_BAR = 1e-4  # epsilon-prediction models are not read where alpha_bar(t) is below this


def _device(unet):
    p = next(iter(unet.parameters()), None) if hasattr(unet, "parameters") else None
    return (p.device, p.dtype) if p is not None else (torch.device("cpu"), torch.float32)


@torch.no_grad()
def x0_shift(unet, scheduler, noising, embeds, clean: torch.Tensor, lowres_marked: torch.Tensor,
             lowres_clean: torch.Tensor, cells: torch.Tensor, timesteps=TIMESTEPS, seed: int = 0) -> dict:
    """The core of the control: the mean change over `cells` ([N, H, W] bool) of the level-0 condition
    (key "condition") and of the model's x0 estimate at each timestep (x_t from `clean`, [N, 3, H, W]),
    between the condition made from `lowres_marked` and from `lowres_clean` (same condition noise)."""
    dev, dt = _device(unet)
    n, size = clean.shape[0], clean.shape[-1]
    level = torch.zeros(n, dtype=torch.long)
    cond = [noised_condition(x.float(), size, level, noising, generator=torch.Generator().manual_seed(seed))
            for x in (lowres_marked, lowres_clean)]
    math_ = DiffusionMath(scheduler.alphas_cumprod)

    def at_cells(d):  # [n, 3, H, W] -> mean over channels and the cells
        return float(d.float().mean(1)[cells].mean())

    out = {"condition": at_cells(cond[0] - cond[1])}
    gen = torch.Generator().manual_seed(seed + 1)
    for t in timesteps:
        if scheduler.config.prediction_type != "v_prediction" and float(math_.alphas_cumprod[int(t)]) < MIN_ALPHA_BAR:
            out[int(t)] = None  # an epsilon model's x0 there is its noise divided by ~0: not a read
            continue
        tt = torch.full((n,), int(t))
        xt = math_.q_sample(clean.float(), torch.randn(clean.shape, generator=gen), tt)
        x0 = []
        for c in cond:
            pred = unet(model_input(xt, c).to(dev, dt), tt.to(dev), encoder_hidden_states=embeds.to(dev, dt),
                        class_labels=level.to(dev), return_dict=False)[0][:, :3].float().cpu()
            ac = math_.alphas_cumprod[tt].view(-1, 1, 1, 1)
            if scheduler.config.prediction_type == "v_prediction":  # exact, also where alpha_bar ~ 0
                x0.append(ac.sqrt() * xt - (1 - ac).sqrt() * pred)
            else:
                x0.append(math_.predict_x0(xt, pred, tt))
        out[int(t)] = at_cells(x0[0] - x0[1])
    return out


def add_marks(lowres: torch.Tensor, seed: int = 0, marks: int = MARKS) -> torch.Tensor:
    """`marks` single pixels per image darkened by |MARK| (pixels bright enough not to clip, 1 px from
    the border, 2 px apart), deterministic from `seed`."""
    out = lowres.clone().float()
    rng = random.Random(f"sr-control-{seed}")
    h, w = lowres.shape[-2:]
    for i in range(len(out)):
        free = [(y, x) for y in range(1, h - 1) for x in range(1, w - 1) if float(out[i, :, y, x].min()) > -1 - MARK]
        rng.shuffle(free)
        chosen = []
        for y, x in free:
            if len(chosen) == marks:
                break
            if all(abs(y - a) > 2 or abs(x - b) > 2 for a, b in chosen):
                chosen.append((y, x))
                out[i, :, y, x] += MARK
    return out


def condition_read(unet, scheduler, noising, embeds, photos: torch.Tensor, low: int, timesteps=TIMESTEPS,
                   seed: int = 0) -> dict:
    """Per timestep, the share of the marks' change of the condition that reaches the x0 estimate, on
    `photos` ([N, 3, H, W] at the SR output size, [-1, 1]) seen at `low` px; "read": the largest share."""
    from stages.data import downsample
    from stages.noise_aug import upsample

    lowres = downsample(photos.float(), low)
    marked = add_marks(lowres, seed)
    delta = (upsample(marked, photos.shape[-1]) - upsample(lowres, photos.shape[-1])).mean(1)
    cells = delta < MARK / 2  # the marks' footprint in the upsampled condition
    shift = x0_shift(unet, scheduler, noising, embeds, photos, marked, lowres, cells, timesteps, seed)
    shares = {t: shift[t] / shift["condition"] for t in timesteps if shift[t] is not None}
    return {"shares": shares, "read": max(shares.values()) if shares else None}


def level_effect(low_outputs: torch.Tensor, high_outputs: torch.Tensor) -> float:
    """1 - the mean high-pass correlation of the same inputs upsampled at a low and a high level."""
    from cascade.evaluation.image_metrics import hp_correlation

    corr = [hp_correlation(a, b) for a, b in zip(low_outputs, high_outputs)]
    return 1.0 - sum(corr) / len(corr)


def verdict(read: float | None, effect: float | None) -> str:
    """"reads its condition", "level effect only", or CANNOT (below both bars)."""
    if read is not None and read >= READ_BAR:
        return "reads its condition"
    if effect is not None and effect >= LEVEL_BAR:
        return "level effect only"
    return CANNOT


def summary(controls: list[dict]) -> dict:
    """model -> verdict over seeds: CANNOT only where the model fails both bars on every seed."""
    out = {}
    for model in dict.fromkeys(c["model"] for c in controls):
        vs = [c["verdict"] for c in controls if c["model"] == model]
        out[model] = CANNOT if all(v == CANNOT for v in vs) else next(v for v in vs if v != CANNOT)
    return out
