"""Attribute readers for the toy world: colour, shape, pattern and emblem of the toy in an image.

They are computed, not learned: the colour is the palette entry nearest the object's median pixel;
the shape is the one whose rendered coverage (at the size its area implies, centred on the object's
centre of mass) best matches the object's coverage at 16 px; the pattern is read from the object's
interior at 64 px (plain: flat; striped: the variation lives in the row means; dotted: it does not);
the emblem is a dark disc at the object's centre. On the generator's own images they are exact
(tests/test_toy_world.py); on samples they are what the study and the bars measure with.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from cascade.toy import world

_BG = np.array(world.BACKGROUND, dtype=np.float32)
_PALETTE = {k: np.array(v, dtype=np.float32) for k, v in world.COLOURS.items()}
_FILL = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5, "cross": 5 / 9}
_LUM = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def as_array(img) -> np.ndarray:
    """PIL image, HWC uint8 array or CHW [-1, 1] tensor -> HWC float32 array in 0..255."""
    if isinstance(img, torch.Tensor):
        return ((img.detach().float().clamp(-1, 1) + 1) * 127.5).permute(1, 2, 0).cpu().numpy()
    return np.asarray(img, dtype=np.float32)[..., :3]


def _lowres(a: np.ndarray) -> np.ndarray:
    if a.shape[0] == world.LO:
        return a
    t = torch.from_numpy(a).permute(2, 0, 1)[None] / 127.5 - 1
    return as_array(world.to_lowres(t)[0])


def read_colour(img) -> str:
    a = _lowres(as_array(img)).reshape(-1, 3)
    far = a[np.linalg.norm(a - _BG, axis=1) > 60]
    if len(far) == 0:
        return "none"
    med = np.median(far, axis=0)
    return min(_PALETTE, key=lambda k: float(np.linalg.norm(_PALETTE[k] - med)))


def _alpha(a16: np.ndarray, colour: str) -> np.ndarray:
    """Per-pixel object coverage: the pixel's projection on the background -> colour segment."""
    d = _PALETTE[colour] - _BG
    return np.clip(((a16 - _BG) @ d) / float(d @ d), 0, 1)


def _fit(shape: str, alpha: np.ndarray) -> tuple[float, tuple[float, float, float]]:
    """L1 distance between `alpha` and `shape` rendered at the size/position the moments imply."""
    area = float(alpha.sum())
    k = world.HI / world.LO
    if area < 1:
        return float("inf"), (0.0, 0.0, 0.0)
    ys, xs = np.mgrid[0:alpha.shape[0], 0:alpha.shape[1]]
    mx = (float((alpha * xs).sum()) / area + 0.5) * k
    my = (float((alpha * ys).sum()) / area + 0.5) * k
    size = k * np.sqrt(area / _FILL[shape])
    best = (float("inf"), (0.0, 0.0, 0.0))
    for s in (size * 0.95, size, size * 1.05):
        cx, cy = mx, my - (s / 6 if shape == "triangle" else 0.0)
        err = float(np.abs(world.coverage(shape, cx, cy, s, world.LO) - alpha).sum())
        best = min(best, (err, (cx, cy, s)))
    return best


def locate(img) -> tuple[str, str, float, float, float]:
    """(colour, shape, cx, cy, size) of the toy, positions in 64 px units."""
    a16 = _lowres(as_array(img))
    colour = read_colour(a16)
    if colour == "none":
        return "none", "none", 0.0, 0.0, 0.0
    alpha = _alpha(a16, colour)
    fits = {s: _fit(s, alpha) for s in world.SHAPES}
    shape = min(fits, key=lambda s: fits[s][0])
    return (colour, shape, *fits[shape][1])


def read_shape(img) -> str:
    return locate(img)[1]


def _interior(a64: np.ndarray, shape: str, cx: float, cy: float, size: float) -> np.ndarray:
    """Pixels well inside the toy and outside the emblem zone, as a boolean mask."""
    inner = world.coverage(shape, cx, cy, size * 0.8 if shape != "cross" else size * 0.9, world.HI) > 0.99
    if shape == "cross":  # thin arms: keep their centre lines only
        inner = world.coverage(shape, cx, cy, size, world.HI) > 0.99
    ex, ey = world.shape_centroid(shape, cx, cy, size)
    ys, xs = np.mgrid[0:world.HI, 0:world.HI] + 0.5
    return inner & ((xs - ex) ** 2 + (ys - ey) ** 2 > (0.25 * size) ** 2)


def read_pattern(img, where=None) -> str:
    """plain | striped | dotted, from a 64 px image (`where`: a `locate` result to reuse)."""
    a = as_array(img)
    if a.shape[0] != world.HI:
        raise ValueError("the pattern is read at 64 px")
    colour, shape, cx, cy, size = where or locate(a)
    if colour == "none":
        return "none"
    m = _interior(a, shape, cx, cy, size)
    if m.sum() < 8:
        return "plain"
    lum = a @ _LUM
    vals = lum[m]
    total = float(vals.var())
    if np.sqrt(total) < 12:
        return "plain"
    # Stripes are horizontal: their variation lies between rows, none between columns; dots vary both ways.
    return "striped" if (_between(lum, m) - _between(lum.T, m.T)) / total > 0.4 else "dotted"


def _between(lum: np.ndarray, m: np.ndarray) -> float:
    """Variance of the row means (weighted by the rows' pixel counts) within mask m."""
    rows = [lum[y][m[y]] for y in range(lum.shape[0]) if m[y].sum() >= 2]
    if not rows:
        return 0.0
    means = np.array([r.mean() for r in rows])
    counts = np.array([len(r) for r in rows], dtype=np.float32)
    return float((counts * (means - lum[m].mean()) ** 2).sum() / counts.sum())


def read_emblem(img, where=None) -> bool:
    """Whether a dark disc sits at the toy's centre (64 px image)."""
    a = as_array(img)
    colour, shape, cx, cy, size = where or locate(a)
    if colour == "none":
        return False
    ex, ey = world.shape_centroid(shape, cx, cy, size)
    ys, xs = np.mgrid[0:a.shape[0], 0:a.shape[1]] + 0.5
    k = a.shape[0] / world.HI
    disc = (xs - ex * k) ** 2 + (ys - ey * k) ** 2 <= (0.1 * size * k) ** 2
    return bool(disc.any() and float((a @ _LUM)[disc].mean()) < 55)


def read(img) -> dict:
    """All attributes a picture shows: colour and shape at any resolution; pattern and emblem at 64 px."""
    a = as_array(img)
    where = locate(a)
    out = {"colour": where[0], "shape": where[1]}
    if a.shape[0] == world.HI:
        out["pattern"] = read_pattern(a, where)
        out["emblem"] = read_emblem(a, where)
    return out


def to_pil(img) -> Image.Image:
    return Image.fromarray(as_array(img).round().clip(0, 255).astype(np.uint8))
