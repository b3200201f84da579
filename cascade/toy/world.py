"""The toy world: one coloured toy on a plain light background, drawn procedurally.

A toy has a colour (6), a shape (4) and a surface pattern (3). Stage II's resolution (64 px) shows
the pattern; stage I's (16 px, the 64 px image downsampled the way the trainer makes low-res views)
averages it away, so only a working super-resolution stage can bring it back from the caption.
Everything is drawn at 4x with PIL and LANCZOS-downsampled, deterministic from a seed.

The subject is one specific toy with an emblem (a black spot at its centre) that the class never shows.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

from stages.data import downsample

HI, LO, SCALE = 64, 16, 4  # stage II / stage I resolution, drawing supersampling
BACKGROUND = (238, 234, 226)
COLOURS = {"red": (215, 40, 40), "green": (40, 160, 60), "blue": (45, 85, 215),
           "yellow": (230, 190, 25), "purple": (145, 60, 185), "orange": (240, 125, 25)}
SHAPES = ("circle", "square", "triangle", "cross")
PATTERNS = ("plain", "striped", "dotted")
CLASS_NOUN = "toy"
SIZE_RANGE = (26.0, 42.0)  # bounding-box side in 64 px units
STRIPE_PERIOD = 4  # 64 px units: two light rows, two dark rows (averages to the base colour at 16 px)
DOT_PERIOD, DOT_RADIUS = 8, 1.7
EMBLEM_COLOUR, EMBLEM_FRACTION = (15, 15, 15), 0.16  # emblem radius as a fraction of the size


@dataclass(frozen=True)
class Toy:
    colour: str
    shape: str
    pattern: str
    cx: float  # centre of the bounding box, 64 px units
    cy: float
    size: float
    emblem: bool = False

    @property
    def attributes(self) -> tuple[str, str, str]:
        return self.colour, self.shape, self.pattern


def shape_polygons(shape: str, cx: float, cy: float, size: float) -> list[list[tuple[float, float]]]:
    """The shape as polygons (a circle is drawn as a 64-gon) in whatever units cx/cy/size use."""
    h = size / 2
    if shape == "circle":
        a = np.linspace(0, 2 * np.pi, 64, endpoint=False)
        return [list(zip(cx + h * np.cos(a), cy + h * np.sin(a)))]
    if shape == "square":
        return [[(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]]
    if shape == "triangle":
        return [[(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)]]
    if shape == "cross":
        w = size / 6
        return [[(cx - w, cy - h), (cx + w, cy - h), (cx + w, cy + h), (cx - w, cy + h)],
                [(cx - h, cy - w), (cx + h, cy - w), (cx + h, cy + w), (cx - h, cy + w)]]
    raise ValueError(f"unknown shape {shape!r}")


def shape_centroid(shape: str, cx: float, cy: float, size: float) -> tuple[float, float]:
    """Centre of mass of the filled shape (the triangle's lies below its box centre)."""
    return (cx, cy + size / 6) if shape == "triangle" else (cx, cy)


def coverage(shape: str, cx: float, cy: float, size: float, res: int) -> np.ndarray:
    """Fraction of each pixel of a res x res canvas the shape covers (drawn at 4x, LANCZOS down)."""
    s = res / HI * SCALE
    mask = Image.new("L", (res * SCALE, res * SCALE), 0)
    d = ImageDraw.Draw(mask)
    for poly in shape_polygons(shape, cx * s, cy * s, size * s):
        d.polygon(poly, fill=255)
    return np.asarray(mask.resize((res, res), Image.LANCZOS), dtype=np.float32) / 255.0


def _shade(c, f):
    return tuple(int(np.clip(v * f, 0, 255)) for v in c)


def _surface(toy: Toy, n: int) -> Image.Image:
    """The toy's full-canvas surface texture at n x n pixels (n = 64 * SCALE)."""
    k = n // HI
    base = COLOURS[toy.colour]
    img = Image.new("RGB", (n, n), base)
    d = ImageDraw.Draw(img)
    if toy.pattern == "striped":
        light, dark = _shade(base, 1.45), _shade(base, 0.55)
        for y in range(0, n, STRIPE_PERIOD * k):
            d.rectangle([0, y, n, y + STRIPE_PERIOD * k // 2 - 1], fill=light)
            d.rectangle([0, y + STRIPE_PERIOD * k // 2, n, y + STRIPE_PERIOD * k - 1], fill=dark)
    elif toy.pattern == "dotted":
        r, dark = DOT_RADIUS * k, _shade(base, 0.35)
        for yy in range(DOT_PERIOD // 2, HI, DOT_PERIOD):
            for xx in range(DOT_PERIOD // 2, HI, DOT_PERIOD):
                d.ellipse([xx * k - r, yy * k - r, xx * k + r, yy * k + r], fill=dark)
    elif toy.pattern != "plain":
        raise ValueError(f"unknown pattern {toy.pattern!r}")
    if toy.emblem:
        ex, ey = shape_centroid(toy.shape, toy.cx, toy.cy, toy.size)
        r = EMBLEM_FRACTION * toy.size * k
        d.ellipse([ex * k - r, ey * k - r, ex * k + r, ey * k + r], fill=EMBLEM_COLOUR)
    return img


def render(toy: Toy) -> Image.Image:
    """The toy as a 64 px RGB image."""
    n = HI * SCALE
    mask = Image.new("L", (n, n), 0)
    d = ImageDraw.Draw(mask)
    for poly in shape_polygons(toy.shape, toy.cx * SCALE, toy.cy * SCALE, toy.size * SCALE):
        d.polygon(poly, fill=255)
    canvas = Image.new("RGB", (n, n), BACKGROUND)
    canvas.paste(_surface(toy, n), (0, 0), mask)
    return canvas.resize((HI, HI), Image.LANCZOS)


def random_toy(rng: random.Random, colour=None, shape=None, pattern=None, emblem: bool = False) -> Toy:
    size = rng.uniform(*SIZE_RANGE)
    m = size / 2 + 3
    return Toy(colour or rng.choice(list(COLOURS)), shape or rng.choice(SHAPES), pattern or rng.choice(PATTERNS),
               rng.uniform(m, HI - m), rng.uniform(m, HI - m), size, emblem)


def caption(colour: str | None, shape: str | None, pattern: str | None, noun: str = CLASS_NOUN) -> str:
    """The grammar: "a [plain|striped|dotted] [colour] [shape] toy", every attribute optional."""
    return " ".join(w for w in ("a", pattern, colour, shape, noun) if w)


def all_captions() -> list[str]:
    """Every caption the grammar makes (4 x 7 x 5 = 140)."""
    return [caption(c, s, p) for p in (None, *PATTERNS) for c in (None, *COLOURS) for s in (None, *SHAPES)]


def training_caption(toy: Toy, rng: random.Random, drop_attribute: float = 0.25) -> str:
    """A caption true of `toy`, each attribute left out with probability `drop_attribute`, so that
    partial prompts ("a toy", "a red toy") mean "any toy with what is said"."""
    keep = [rng.random() >= drop_attribute for _ in range(3)]
    return caption(toy.colour if keep[0] else None, toy.shape if keep[1] else None,
                   toy.pattern if keep[2] else None)


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """PIL images -> [B, 3, H, W] in [-1, 1]."""
    a = np.stack([np.asarray(im, dtype=np.float32) for im in images])
    return torch.from_numpy(a).permute(0, 3, 1, 2) / 127.5 - 1.0


def to_lowres(x: torch.Tensor) -> torch.Tensor:
    """Stage I's view of 64 px images: the same antialiased downsampling the stage II trainer uses."""
    return downsample(x, LO)


def dataset(n: int, seed: int) -> tuple[list[Toy], torch.Tensor]:
    """n random toys and their 64 px images ([-1, 1]), deterministic from `seed`."""
    rng = random.Random(seed)
    toys = [random_toy(rng) for _ in range(n)]
    return toys, to_tensor([render(t) for t in toys])


# The subject: one particular toy, with an emblem no toy of the class shows.
SUBJECT = dict(colour="purple", shape="square", pattern="striped")
SUBJECT_POSES = [(32.0, 32.0, 38.0), (24.0, 26.0, 30.0), (40.0, 38.0, 33.0), (27.0, 39.0, 36.0), (38.0, 25.0, 28.0)]


def subject_toys() -> list[Toy]:
    return [Toy(**SUBJECT, cx=x, cy=y, size=s, emblem=True) for x, y, s in SUBJECT_POSES]


def subject_photos() -> list[Image.Image]:
    """The subject's 5 "photos" (64 px) in different positions and sizes."""
    return [render(t) for t in subject_toys()]
