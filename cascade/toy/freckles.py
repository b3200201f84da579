"""The subject's freckles: find them in a 64 px image, score their placement, and the premise oracle.

- `detect(image, mask)`: positions of small dark dots, read along rows only (a pixel darker than both
  of its horizontal neighbourhoods 2-3 px away), so the horizontal stripes, the emblem's and the shape's
  edges do not count; peaks closer than 0.75 FRECKLE_GAP are merged.
- `f1(found, truth)`: position F1, a dot counting as found within MATCH_RADIUS px of a true one.
- `oracle(...)`: the best any SR model could do from its condition. It is given everything except the
  freckles' positions (the freckle-free 16 px view of the same pose, the number of freckles), takes the
  noised condition exactly as stage II sees it (16 px view upsampled to 64 px, noised by IF's
  image_noising_scheduler at level L), matched-filters the residual and picks the strongest dips.
  If it cannot place the freckles at a level, no model can; docs/toy-world.md has its numbers.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F

from cascade.toy import world

MATCH_RADIUS = 2.5  # 64 px units: a bit more than half a 16 px pixel
THRESHOLD = 0.08    # luminance dip (0..1) of a detected dot; the truth's freckles dip 0.15 .. 0.5
_LUMA = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)


def luminance(image: torch.Tensor) -> torch.Tensor:
    """[3, H, W] in [-1, 1] -> [H, W] luminance in 0..1."""
    return ((image.float().clamp(-1, 1) + 1) / 2 * _LUMA).sum(0)


def interior(toy: world.Toy, margin: float = 1.5) -> torch.Tensor:
    """[64, 64] bool: pixels at least `margin` px inside the toy's shape (the truth's mask)."""
    cov = torch.from_numpy(world.coverage(toy.shape, toy.cx, toy.cy, toy.size, world.HI))
    k = int(2 * round(margin) + 1)
    inside = -F.max_pool2d(-cov[None, None], k, 1, k // 2)[0, 0] > 0.99
    if toy.emblem:  # the emblem's narrow top and bottom rows read as dots along a row
        ex, ey = world.shape_centroid(toy.shape, toy.cx, toy.cy, toy.size)
        yy, xx = torch.meshgrid(torch.arange(world.HI) + 0.5, torch.arange(world.HI) + 0.5, indexing="ij")
        inside &= (xx - ex) ** 2 + (yy - ey) ** 2 > (world.EMBLEM_FRACTION * toy.size + 2.5) ** 2
    return inside


def object_mask(image: torch.Tensor, margin: int = 2) -> torch.Tensor:
    """[64, 64] bool: the object's interior estimated from the image itself (pixels away from the
    background colour, eroded by `margin`), for images whose pose is unknown (stage I samples)."""
    bg = torch.tensor(world.BACKGROUND, dtype=torch.float32).view(3, 1, 1) / 127.5 - 1
    obj = ((image.float() - bg).abs().amax(0) > 0.25).float()
    k = 2 * margin + 1
    inside = -F.max_pool2d(-obj[None, None], k, 1, margin)[0, 0] > 0.5
    # large dark blobs (an emblem) are not freckles, nor are their rims: what survives a 5 x 5 erosion
    # of the dark pixels, grown by 4 px
    dark = (luminance(image) < 0.15).float()[None, None]
    blob = -F.max_pool2d(-dark, 5, 1, 2)
    return inside & ~(F.max_pool2d(blob, 13, 1, 6)[0, 0] > 0.5)


def response(image: torch.Tensor) -> torch.Tensor:
    """[H, W]: how much darker each pixel is than both its left and right neighbourhoods (2-3 px away)."""
    lum = F.pad(luminance(image)[None, None], (3, 3, 0, 0), mode="replicate")[0, 0]
    c = lum[:, 3:-3]
    left = (lum[:, 0:-6] + lum[:, 1:-5]) / 2
    right = (lum[:, 5:-1] + lum[:, 6:]) / 2
    return torch.minimum(left, right) - c


def _peaks(score: torch.Tensor, mask: torch.Tensor, threshold: float, top: int | None = None) -> list:
    """Local maxima of `score` inside `mask` above `threshold` (or the `top` strongest), greedy
    suppression within 0.75 FRECKLE_GAP (true dots are FRECKLE_GAP apart); sub-pixel position by the score-weighted 3x3 centroid."""
    s = score.clone()
    s[~mask] = -np.inf
    out, r = [], world.FRECKLE_GAP * 0.75
    yy, xx = torch.meshgrid(torch.arange(s.shape[0]), torch.arange(s.shape[1]), indexing="ij")
    while True:
        v, i = s.flatten().max(0)
        if (top is not None and len(out) >= top) or not torch.isfinite(v) or (top is None and v <= threshold):
            return out
        y, x = divmod(int(i), s.shape[1])
        win = score[max(0, y - 1):y + 2, max(0, x - 1):x + 2].clamp(min=0) + 1e-6
        wy, wx = yy[max(0, y - 1):y + 2, max(0, x - 1):x + 2], xx[max(0, y - 1):y + 2, max(0, x - 1):x + 2]
        # pixel (x, y) covers [x, x + 1) in the 64 px units the world draws in
        out.append((float((wx * win).sum() / win.sum()) + 0.5, float((wy * win).sum() / win.sum()) + 0.5))
        s[(yy - y) ** 2 + (xx - x) ** 2 <= r * r] = -np.inf


def detect(image: torch.Tensor, mask: torch.Tensor, threshold: float = THRESHOLD) -> list[tuple[float, float]]:
    """Freckle positions (64 px units) found in `image` ([3, 64, 64], [-1, 1]) inside `mask`."""
    return _peaks(response(image), mask, threshold)


def f1(found, truth, radius: float = MATCH_RADIUS) -> float:
    """Position F1: greedy one-to-one matching of found to true dots within `radius` px (1.0 when both
    are empty)."""
    if not found and not truth:
        return 1.0
    if not found or not truth:
        return 0.0
    pairs = sorted((np.hypot(a[0] - b[0], a[1] - b[1]), i, j) for i, a in enumerate(found) for j, b in enumerate(truth))
    used_f, used_t, hits = set(), set(), 0
    for d, i, j in pairs:
        if d <= radius and i not in used_f and j not in used_t:
            used_f.add(i)
            used_t.add(j)
            hits += 1
    p, r = hits / len(found), hits / len(truth)
    return 0.0 if hits == 0 else 2 * p * r / (p + r)


def score(image: torch.Tensor, toy: world.Toy) -> dict:
    """Freckle F1 and count of `image` read against the true pose `toy`."""
    found = detect(image, interior(toy))
    return {"freckle_f1": f1(found, list(toy.freckles)), "freckles_found": len(found)}


def _from_condition(p):
    """A position read in the upsampled condition -> world units: IF upsamples with align_corners=True,
    so 16 px pixel i's centre lands on 64 px pixel i * 63 / 15, not on (i + 0.5) * 4 - 0.5."""
    return tuple(((v - 0.5) * (world.LO - 1) / (world.HI - 1) + 0.5) * (world.HI // world.LO) for v in p)


def _template() -> torch.Tensor:
    """Matched filter: the mean dip one freckle leaves in the upsampled 16 px view (7 x 7 at 64 px)."""
    g = torch.arange(-3, 4, dtype=torch.float32)
    k = torch.exp(-(g[:, None] ** 2 + g[None] ** 2) / (2 * 2.0 ** 2))
    return (k / k.norm())[None, None]


@torch.no_grad()
def oracle(toys: list[world.Toy], level: int, noising, seed: int = 0) -> list[float]:
    """Per toy, the F1 of the matched-filter oracle at noise level `level` (see the module doc)."""
    hi = world.to_tensor([world.render(t) for t in toys])
    clean = world.to_tensor([world.render(dataclasses.replace(t, freckles=())) for t in toys])
    from stages.noise_aug import noised_condition, upsample

    gen = torch.Generator().manual_seed(seed)
    cond = noised_condition(world.to_lowres(hi), world.HI, torch.full((len(toys),), level), noising, generator=gen)
    ref = upsample(world.to_lowres(clean), world.HI)
    resid = (ref - cond).mean(1, keepdim=True)  # a dip is positive
    mf = F.conv2d(resid, _template(), padding=3)[:, 0]
    out = []
    for m, t in zip(mf, toys):
        found = [_from_condition(p) for p in _peaks(m, interior(t), -np.inf, top=len(t.freckles))]
        out.append(f1(found, list(t.freckles)))
    return out


def chance(toys: list[world.Toy], seed: int = 0) -> list[float]:
    """Per toy, the F1 of as many dots placed at random where freckles may sit (on a light stripe's
    centre row inside the toy, FRECKLE_GAP apart): the floor the oracle is read against."""
    import random

    rng = random.Random(f"chance-{seed}")
    return [f1(list(world.interior_points(rng, dataclasses.replace(t, freckles=()), len(t.freckles))),
               list(t.freckles)) for t in toys]


def background_mask(toy: world.Toy, margin: float = 2.0) -> torch.Tensor:
    """[64, 64] bool: background at least `margin` px from the toy and 2 px from the canvas edge."""
    cov = torch.from_numpy(world.coverage(toy.shape, toy.cx, toy.cy, toy.size, world.HI))
    k = int(2 * round(margin) + 1)
    near = F.max_pool2d(cov[None, None], k, 1, k // 2)[0, 0] > 0.01
    edge = torch.zeros_like(near)
    edge[2:-2, 2:-2] = True
    return ~near & edge


def _speck_cells(toy: world.Toy) -> torch.Tensor:
    """[64, 64] bool: the 3 x 3 pixels around each of the toy's background specks."""
    m = torch.zeros(world.HI, world.HI, dtype=torch.bool)
    for x, y in toy.specks:
        m[max(0, int(y) - 1):int(y) + 2, max(0, int(x) - 1):int(x) + 2] = True
    return m


@torch.no_grad()
def condition_sensitivity(unet, scheduler, noising, embed, n: int, timesteps=(300, 500, 700),
                          seed: int = 0) -> dict:
    """Does the SR read a faint dot in its condition at all? `n` fresh pool toys with background specks
    (their captions through `embed(prompts)` -> {prompt: [1, 77, D]}); x_t is made from the speck-free image, so only the condition
    (level 0) shows the specks: once from the image with specks, once without. Returns, per timestep,
    the mean change of the predicted x0 over each speck's 3 x 3 pixels (negative = darker with the specks;
    the true dot is about -1.2 at its pixel), and under "condition" the same change of the condition itself,
    which a model that copied its condition would show."""
    toys, hi = world.dataset(n, 2_000_000, specks=1.0)  # not the pretraining pool (seed 1)
    clean = world.to_tensor([world.render(dataclasses.replace(t, specks=())) for t in toys])
    return x0_read(unet, scheduler, noising, embed, toys, hi, clean, torch.stack([_speck_cells(t) for t in toys]),
                   timesteps, seed)


def x0_read(unet, scheduler, noising, embed, toys, hi: torch.Tensor, clean: torch.Tensor, cells: torch.Tensor,
            timesteps, seed: int) -> dict:
    """sr_control.x0_shift on toy renders `hi` (with the detail) and `clean` (without), each toy with
    its own caption: what the freckle and glyph condition reads share."""
    from cascade.evaluation.sr_control import x0_shift

    prompts = [world.caption(*t.attributes) for t in toys]
    emb = embed(prompts)
    embeds = torch.cat([emb[p] for p in prompts])
    return x0_shift(unet, scheduler, noising, embeds, clean, world.to_lowres(hi), world.to_lowres(clean), cells,
                    timesteps, seed)

@torch.no_grad()
def speck_control(pipe, n: int, levels: list[int], steps: int, embed) -> dict:
    """The control for "the SR cannot draw what it sees", per level: "specks": `n` fresh toys of the stage
    II pretraining kind (specks on the background), speck position F1 on the background; "subject": `n`
    fresh subject views (new poses and freckles, its full caption), freckle F1 on the toy. Both upsampled
    by the SR pipeline `pipe` (an IFSuperResolutionPipeline), against the truth and bilinear upsampling.
    `embed(prompts)` -> {prompt: [1, 77, D]}."""
    pool, _ = world.dataset(n, 2_000_000, specks=1.0)  # not the pretraining pool (seed 1)
    subject = world.fresh_subject_toys(n, 7)  # not the study's fresh views (seed 0)
    return {"specks": _reads(pipe, pool, [background_mask(t) for t in pool], [list(t.specks) for t in pool],
                             levels, steps, embed),
            "subject": _reads(pipe, subject, [interior(t) for t in subject], [list(t.freckles) for t in subject],
                              levels, steps, embed)}


def _reads(pipe, toys, masks, truth, levels, steps, embed) -> dict:
    import statistics

    from stages.noise_aug import upsample
    from stages.sampling import sample

    lo = world.to_lowres(world.to_tensor([world.render(t) for t in toys]))
    prompts = [world.caption(*t.attributes) for t in toys]
    emb = embed(prompts + [""])
    e = torch.cat([emb[p] for p in prompts])
    bil = [f1(detect(u, m), tr) for u, m, tr in zip(upsample(lo, world.HI), masks, truth)]
    out = {}
    for lv in levels:
        gens = [torch.Generator().manual_seed(i) for i in range(len(toys))]
        ims = sample(pipe.unet, pipe.scheduler, e, emb[""], steps, 4.0, gens, world.HI, lowres=lo, noise_level=lv,
                     noising_scheduler=pipe.image_noising_scheduler)
        found = [detect(im, m) for im, m in zip(ims, masks)]
        v = [f1(fd, tr) for fd, tr in zip(found, truth)]
        out[lv] = {"f1": statistics.mean(v), "f1_std": statistics.pstdev(v), "found": statistics.mean(map(len, found)),
                   "true": statistics.mean(map(len, truth)), "bilinear_f1": statistics.mean(bil)}
    return out
