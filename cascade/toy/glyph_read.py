"""Reading the subject's glyph in a 64 px image (issue 28): where is it, and is it drawn?

The subject's surface is horizontal stripes (light and dark rows, period 4); the glyph is a patch
where they stop. So the reader looks for flatness, not for a colour: `flatness(image)` is 1 where a
pixel equals the pixel two rows below (the opposite stripe phase) and 0 where they differ as much as
the stripes do, inside the object (read from the image: freckles.object_mask, which leaves out the
emblem and its rim). `locate(image)` is the centre where the glyph's own bar mask, correlated with
that flatness, responds most; `response_at(image, centre)` that response at a given centre.

Truth readers for `cascade study-sr` (fn(output, truth) -> float):
- `glyph_hit`: 1.0 if the glyph found in the output lies within freckles.MATCH_RADIUS of the one
  found in the truth (on truth renders the reader finds it exactly: tests/test_toy_glyph.py);
- `glyph_drawn`: the output's response at the truth's glyph centre over the truth's own (1 = drawn
  as in the truth, 0 = stripes run through the place).
Reader without a truth (drift: does the SR draw the glyph on other striped toys?):
- `glyph_score(image)`: the largest, over centres on the object, of (the glyph's bars' mean flatness) x
  (the share of object pixels striped in a ring 5-6 px around the centre). A glyph needs stripes that
  stop: a surface with no stripes (a plain toy, bilinear upsampling) scores ~0 however flat it is.
- `glyph_anywhere(image)`: 1.0 where glyph_score reaches DRAWN (a glyph drawn somewhere), else 0.0.
  On renders (tests/test_toy_glyph.py) 20 other striped toys with the glyph placed score 0.55-0.91, the
  same toys without it 0.05-0.32, plain toys 0.00-0.03 and bilinear upsampling 0.09-0.28. On SR outputs
  it is not specific: it fires on 0.70 of the base SR's striped samples of other toys, which cannot hold
  the F (docs/sr-study.md, "Drift onto other toys").
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from cascade.toy import world
from cascade.toy.freckles import MATCH_RADIUS, luminance, object_mask

STRIPE_CONTRAST = 0.35  # luminance difference (0..1) of the subject's light and dark rows, about
DRAWN = 0.45  # glyph_score between a drawn glyph's and intact stripes' (see the module docstring)


def _bar_mask() -> torch.Tensor:
    """[9, 9] float: the glyph's bars around the centre pixel (4, 4), zero-mean (a flat region larger
    than the glyph responds no more than the glyph itself)."""
    yy, xx = torch.meshgrid(torch.arange(9) - 4 + 0.5, torch.arange(9) - 4 + 0.5, indexing="ij")
    m = torch.zeros(9, 9)
    for x0, y0, x1, y1 in world.GLYPH:
        m = torch.maximum(m, ((xx >= x0) & (xx < x1) & (yy >= y0) & (yy < y1)).float())
    return m - m.mean()


def flatness(image: torch.Tensor) -> torch.Tensor:
    """[64, 64] in 0..1 inside the object (0 outside): 1 - |L(y) - L(y+2)| / STRIPE_CONTRAST, the
    larger of the pairs with the rows two above and two below."""
    lum = luminance(image)
    pad = F.pad(lum[None, None], (0, 0, 2, 2), mode="replicate")[0, 0]
    diff = torch.minimum((pad[4:] - lum).abs(), (pad[:-4] - lum).abs())
    flat = (1 - diff / STRIPE_CONTRAST).clamp(0, 1)
    return flat * object_mask(image, margin=1).float()


def _responses(image: torch.Tensor) -> torch.Tensor:
    return F.conv2d(flatness(image)[None, None], _bar_mask()[None, None], padding=4)[0, 0]


def locate(image: torch.Tensor) -> tuple[float, float]:
    """The (x, y) pixel centre (64 px units, as world.Toy.glyph holds it) of the strongest response."""
    r = _responses(image)
    y, x = divmod(int(r.flatten().argmax()), r.shape[-1])
    return float(x), float(y)


def response_at(image: torch.Tensor, centre: tuple[float, float]) -> float:
    """The response at `centre`, the best within 1 px (the pixel grid of a drawn glyph may shift)."""
    r = _responses(image)
    x, y = int(round(centre[0])), int(round(centre[1]))
    return float(r[max(0, y - 1):y + 2, max(0, x - 1):x + 2].max())


def glyph_hit(output: torch.Tensor, truth: torch.Tensor) -> float:
    (ox, oy), (tx, ty) = locate(output), locate(truth)
    return float((ox - tx) ** 2 + (oy - ty) ** 2 <= MATCH_RADIUS ** 2)


def glyph_drawn(output: torch.Tensor, truth: torch.Tensor) -> float:
    centre = locate(truth)
    return response_at(output, centre) / max(response_at(truth, centre), 1e-6)


def _ring() -> torch.Tensor:
    """[13, 13]: the pixels 5-6 px (Chebyshev) from the centre, just outside the glyph's 9 x 9 window."""
    k = torch.ones(13, 13)
    k[2:11, 2:11] = 0
    return k


def glyph_score(image: torch.Tensor, mirrored: bool = False) -> float:
    """`mirrored`: the same score for the F mirrored left-right, a control: a mark that is the subject's F
    scores higher unmirrored (renders: by 0.06-0.17), a symmetric flat patch the same both ways."""
    flat = flatness(image)
    inside = object_mask(image, margin=1).float()
    bars = (_bar_mask() > 0).float()
    bars = bars.flip(-1).roll(-1, -1) if mirrored else bars  # about the F's own centre column
    bar_flat = F.conv2d(flat[None, None], bars[None, None], padding=4)[0, 0] / bars.sum()
    ring = _ring()[None, None]
    striped = F.conv2d(((1 - flat) * inside)[None, None], ring, padding=6)[0, 0]
    cover = F.conv2d(inside[None, None], ring, padding=6)[0, 0]
    # at least half the ring on the object, so the toy's edge (masked to 0 flatness) does not count as stripes
    ring_striped = torch.where(cover >= 0.5 * ring.sum(), striped / cover.clamp(min=1), torch.zeros_like(cover))
    return float((bar_flat * ring_striped).max())


def glyph_anywhere(image: torch.Tensor) -> float:
    return float(glyph_score(image) >= DRAWN)
