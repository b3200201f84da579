"""The subject's own fine mark (issue 28, gate 1): a small asymmetric glyph, `world.GLYPH` (an "F" about
4.5 x 6 px at 64 px), whose appearance belongs to the subject and whose placement changes per photo,
so only the low-res view can say where it is, and only while the condition is not too noisy.

- `place(rng, toy)`: a glyph centre inside the toy (integer 64 px position, clear of the edge and
  the emblem).
- `subject_views(n, seed)`: n views of the subject (new poses) carrying the glyph instead of freckles;
  `photo_toys()` / `photos()`: its 5 photos (the world's poses) with the glyph (demo, study).
- `oracle(toys, level, noising)`: the best placement any SR model could make from its condition. It
  knows everything but the glyph's position: the toy without the glyph and the glyph's exact low-res
  footprint at every candidate position. It takes the condition as stage II sees it (16 px upsampled
  to 64 px, noised by IF's image_noising_scheduler at `level`), projects it back onto the 16 px grid
  (4 x 4 means: the condition's detail lives there) and picks the candidate whose footprint best
  matches the residual. Hit = within freckles.MATCH_RADIUS px of the true centre; per toy 1 or 0.
- `chance(toys)`: the hit rate of a candidate picked at random (the floor).
- `with_marks(toys, seed, fraction)`: stage II's pretraining pool with marks of the glyph's kind
  (`world.POOL_GLYPHS`, never the F) on `fraction` of its toys (gate 2).
- `condition_sensitivity(...)`: gate 2's measure: how much of the glyph's change of the condition
  reaches an SR model's x0 estimate.
"""
from __future__ import annotations

import dataclasses
import functools
import random

import torch
import torch.nn.functional as F

from cascade.toy import world
from cascade.toy.freckles import MATCH_RADIUS

MARGIN = 5.0  # 64 px units from the toy's edge (the glyph reaches 3 px from its centre)


@functools.lru_cache(maxsize=256)
def _allowed(toy: world.Toy) -> torch.Tensor:
    """[64, 64] bool over integer centres: where the glyph may sit on `toy` (cached: toys are frozen)."""
    cov = torch.from_numpy(world.coverage(toy.shape, toy.cx, toy.cy, toy.size, world.HI * 2))
    k = int(MARGIN * 2) * 2 + 1
    inside = (-F.max_pool2d(-cov[None, None], k, 1, k // 2)[0, 0] > 0.99)[::2, ::2]  # at integer positions
    ex, ey = world.shape_centroid(toy.shape, toy.cx, toy.cy, toy.size)
    yy, xx = torch.meshgrid(torch.arange(world.HI).float(), torch.arange(world.HI).float(), indexing="ij")
    clear = (xx - ex) ** 2 + (yy - ey) ** 2 > (world.EMBLEM_FRACTION * toy.size + MARGIN) ** 2 if toy.emblem else True
    border = (xx >= 8) & (xx < world.HI - 8) & (yy >= 8) & (yy < world.HI - 8)  # its footprint stays on the canvas
    return inside & clear & border


def place(rng: random.Random, toy: world.Toy) -> tuple[float, float]:
    ys, xs = torch.nonzero(_allowed(toy), as_tuple=True)
    i = rng.randrange(len(xs))
    return float(xs[i]), float(ys[i])


def with_marks(toys: list[world.Toy], seed: int, fraction: float) -> list[world.Toy]:
    """`toys` with 1-2 random POOL_GLYPHS marks on `fraction` of them (a separate random stream, so the
    toys themselves are unchanged; toys with no room for a mark stay unmarked)."""
    rng = random.Random(f"pool-marks-{seed}")
    letters = sorted(world.POOL_GLYPHS)
    out = []
    for t in toys:
        if rng.random() < fraction and bool(_allowed(t).any()):
            marks = tuple((*place(rng, t), rng.choice(letters)) for _ in range(rng.randint(1, 2)))
            t = dataclasses.replace(t, marks=marks)
        out.append(t)
    return out


def subject_views(n: int, seed) -> list[world.Toy]:
    """n views of the subject in new poses, each with the glyph placed anew (no freckles)."""
    rng = random.Random(f"glyph-subject-{seed}")
    out = []
    for i in range(n):
        size = rng.uniform(32.0, 40.0)
        m = size / 2 + 3
        out.append(_subject_with_glyph(rng.uniform(m, world.HI - m), rng.uniform(m, world.HI - m), size, rng))
    return out


def _subject_with_glyph(cx: float, cy: float, size: float, rng: random.Random) -> world.Toy:
    t = world.Toy(**world.SUBJECT, cx=cx, cy=cy, size=size, emblem=True)
    return dataclasses.replace(t, glyph=(place(rng, t),))


def photo_toys() -> list[world.Toy]:
    """The subject's 5 photos (world.SUBJECT_POSES) with the glyph, placed anew per photo, and no
    freckles: what the demo and the study fine-tune on since issue 28."""
    return [_subject_with_glyph(x, y, size, random.Random(f"glyph-photo-{i}"))
            for i, (x, y, size) in enumerate(world.SUBJECT_POSES)]


def photos():
    return [world.render(t) for t in photo_toys()]


def _project(x: torch.Tensor) -> torch.Tensor:
    """A 64 px condition back onto the 16 px grid (linear: no clamping)."""
    return F.avg_pool2d(x, world.HI // world.LO)


def _lowres_condition(images: torch.Tensor) -> torch.Tensor:
    from stages.noise_aug import upsample

    return _project(upsample(world.to_lowres(images), world.HI))


def footprints() -> dict:
    """(x % 4, y % 4) -> the glyph's footprint [3, 16, 16] in the projected condition with its centre at
    (32 + x % 4, 32 + y % 4), on the subject's own (striped) surface; other positions are whole
    low-res pixel shifts of these (the stripes repeat every 4 px)."""
    plain = world.Toy(**world.SUBJECT, cx=32.0, cy=32.0, size=64.0)
    base = _lowres_condition(world.to_tensor([world.render(plain)]))[0]
    out = {}
    for px in range(4):
        for py in range(4):
            marked = dataclasses.replace(plain, glyph=((32.0 + px, 32.0 + py),))
            out[(px, py)] = _lowres_condition(world.to_tensor([world.render(marked)]))[0] - base
    return out


def _scores(resid: torch.Tensor, feet: dict) -> torch.Tensor:
    """[64, 64]: the matched filter's response for a glyph centred at each integer position: the
    residual [3, 16, 16] correlated with the footprint of that position's phase, at its low-res shift
    (a glyph at x = 32 + p + 4 s has the phase-p footprint moved by s low-res pixels)."""
    out = torch.empty(world.HI, world.HI)
    for (px, py), f in feet.items():
        k = f[:, 5:12, 5:12]  # 7 x 7 low-res pixels around the centre pixel 8 hold the footprint
        c = F.conv2d(resid[None], k[None], padding=3)[0, 0] / k.norm()
        out[py::4, px::4] = c
    return out


@torch.no_grad()
def oracle(toys: list[world.Toy], level: int, noising, seed: int = 0, feet: dict | None = None) -> list[float]:
    """Per toy, 1.0 if the oracle (module doc) places the glyph within MATCH_RADIUS at noise `level`."""
    from stages.noise_aug import noised_condition

    feet = feet or footprints()
    hi = world.to_tensor([world.render(t) for t in toys])
    clean = world.to_tensor([world.render(dataclasses.replace(t, glyph=())) for t in toys])
    gen = torch.Generator().manual_seed(seed)
    lv = torch.full((len(toys),), level)
    cond = _project(noised_condition(world.to_lowres(hi), world.HI, lv, noising, generator=gen))
    scale = noising.alphas_cumprod[level].sqrt()  # add_noise scales the image as well
    resid = cond - scale * _lowres_condition(clean)
    out = []
    for r, t in zip(resid, toys):
        s = _scores(r, feet).masked_fill(~_allowed(t), -float("inf"))
        by, bx = divmod(int(s.flatten().argmax()), world.HI)
        gx, gy = t.glyph[0]
        out.append(float((bx - gx) ** 2 + (by - gy) ** 2 <= MATCH_RADIUS ** 2))
    return out


def chance(toys: list[world.Toy]) -> list[float]:
    """Per toy, the probability that a uniformly random allowed centre lands within MATCH_RADIUS."""
    out = []
    for t in toys:
        ys, xs = torch.nonzero(_allowed(t), as_tuple=True)
        gx, gy = t.glyph[0]
        out.append(float((((xs - gx) ** 2 + (ys - gy) ** 2) <= MATCH_RADIUS ** 2).float().mean()))
    return out


def glyph_cells(toy: world.Toy) -> torch.Tensor:
    """[64, 64] bool: the 64 px pixels the toy's glyph bars cover."""
    yy, xx = torch.meshgrid(torch.arange(world.HI) + 0.5, torch.arange(world.HI) + 0.5, indexing="ij")
    m = torch.zeros(world.HI, world.HI, dtype=torch.bool)
    for gx, gy in toy.glyph:
        for x0, y0, x1, y1 in world.GLYPH:
            m |= (xx >= gx + x0) & (xx < gx + x1) & (yy >= gy + y0) & (yy < gy + y1)
    return m


@torch.no_grad()
def condition_sensitivity(unet, scheduler, noising, embed, n: int, timesteps=(500, 999), seed: int = 0) -> dict:
    """Gate 2: does the SR read the glyph from its condition? `n` subject views with the glyph (not the
    study's views: seed 1000 + seed) and their captions through `embed(prompts)` -> {prompt: [1, 77, D]};
    x_t is made from the view without the glyph, so only the (level-0) condition shows it: once with,
    once without. Per timestep, the mean change of the x0 estimate over the glyph's pixels, "condition"
    the same change of the condition itself (what a model that copied its condition shows), and "share"
    per timestep: the first over the second (gate 2: >= 0.5 at 500 and 999)."""
    from cascade.toy.freckles import x0_read

    toys = subject_views(n, 1000 + seed)
    hi = world.to_tensor([world.render(t) for t in toys])
    clean = world.to_tensor([world.render(dataclasses.replace(t, glyph=())) for t in toys])
    out = x0_read(unet, scheduler, noising, embed, toys, hi, clean, torch.stack([glyph_cells(t) for t in toys]),
                  timesteps, seed)
    out["share"] = {t: out[t] / out["condition"] for t in timesteps}
    return out
