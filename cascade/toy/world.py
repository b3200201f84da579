"""The toy world: one coloured toy on a plain light background, drawn procedurally.

A toy has a colour (6), a shape (4) and a surface pattern (3). Stage II's resolution (64 px) shows
the pattern; stage I's (16 px, the 64 px image downsampled the way the trainer makes low-res views)
averages it away, so only a working super-resolution stage can bring it back from the caption.
Everything is drawn at 4x with PIL and LANCZOS-downsampled, deterministic from a seed.

The subject is one specific toy with an emblem (a black spot at its centre) that the class never shows,
and freckles: about 1 px dark dots at 64 px whose positions differ per photo (a dip of ~0.05 at 16 px).
Neither the caption nor memory can place them; only the low-res view can, so they are the detail the SR
noise-augmentation study reads (docs/toy-world.md). Class toys never carry freckles; stage II's
pretraining pool carries the same dots as "specks" on the background (`dataset(specks=...)`) and, with
`toy_specks`, at random places on its toys too, so the base SR may learn to sharpen a faint dot it can
see without ever seeing the subject's.
"""
from __future__ import annotations

import dataclasses
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
FRECKLE_COLOUR, FRECKLE_RADIUS = (20, 20, 20), 0.5  # 64 px units: a ~1 px dark dot
FRECKLES = 6  # per subject photo
FRECKLE_GAP = 8.0  # minimum distance between dots (2 px at 16 px, so their dips stay apart)
# The subject's own mark (issue 28): an "F" of three bars, (x0, y0, x1, y1) around its centre in 64 px
# units; asymmetric (no rotation or mirror maps it onto itself), fixed appearance, placed anew per photo
GLYPH = ((-2.0, -3.0, -0.5, 3.0), (-0.5, -3.0, 2.5, -1.5), (-0.5, -0.5, 1.5, 1.0))
GLYPH_SHADE = 0.88  # the glyph's colour: the toy's colour x this, unstriped (at 16 px a dip of ~0.06)
# Marks of the glyph's kind for stage II's pretraining pool (issue 28, gate 2): letters of bars in the
# same box and shade, so reading a faint unstriped patch is a general skill of the base SR; never the F
POOL_GLYPHS = {
    "L": ((-2.0, -3.0, -0.5, 3.0), (-0.5, 1.5, 2.5, 3.0)),
    "T": ((-2.0, -3.0, 2.5, -1.5), (-0.5, -1.5, 1.0, 3.0)),
    "E": (*GLYPH[:2], (-0.5, -0.5, 1.5, 1.0), (-0.5, 1.5, 2.5, 3.0)),
    "H": ((-2.0, -3.0, -0.5, 3.0), (1.0, -3.0, 2.5, 3.0), (-0.5, -0.5, 1.0, 1.0)),
    "C": ((-2.0, -3.0, -0.5, 3.0), (-0.5, -3.0, 2.5, -1.5), (-0.5, 1.5, 2.5, 3.0)),
    "U": ((-2.0, -3.0, -0.5, 3.0), (1.0, -3.0, 2.5, 3.0), (-0.5, 1.5, 1.0, 3.0)),
}


@dataclass(frozen=True)
class Toy:
    colour: str
    shape: str
    pattern: str
    cx: float  # centre of the bounding box, 64 px units
    cy: float
    size: float
    emblem: bool = False
    freckles: tuple = ()  # ((x, y), ...) dark dots on the toy, 64 px units (the subject only)
    specks: tuple = ()  # ((x, y), ...) the same dots on the background (stage II pretraining pool)
    glyph: tuple = ()  # ((x, y), ...) centres of the subject's own mark (GLYPH), 64 px units (cascade/toy/glyph.py)
    marks: tuple = ()  # ((x, y, letter), ...) POOL_GLYPHS marks (stage II pretraining pool, glyph.with_marks)

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
    _dots(d, toy.freckles, k)
    for gx, gy, bars in [(x, y, GLYPH) for x, y in toy.glyph] + [(x, y, POOL_GLYPHS[c]) for x, y, c in toy.marks]:
        for x0, y0, x1, y1 in bars:
            d.rectangle([(gx + x0) * k, (gy + y0) * k, (gx + x1) * k - 1, (gy + y1) * k - 1],
                        fill=_shade(base, GLYPH_SHADE))
    return img


def _dots(d: ImageDraw.ImageDraw, points, k: int):
    r = FRECKLE_RADIUS * k
    for x, y in points:
        d.ellipse([x * k - r, y * k - r, x * k + r, y * k + r], fill=FRECKLE_COLOUR)


def render(toy: Toy) -> Image.Image:
    """The toy as a 64 px RGB image."""
    n = HI * SCALE
    mask = Image.new("L", (n, n), 0)
    d = ImageDraw.Draw(mask)
    for poly in shape_polygons(toy.shape, toy.cx * SCALE, toy.cy * SCALE, toy.size * SCALE):
        d.polygon(poly, fill=255)
    canvas = Image.new("RGB", (n, n), BACKGROUND)
    _dots(ImageDraw.Draw(canvas), toy.specks, SCALE)
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


def dataset(n: int, seed: int, specks: float = 0.0, toy_specks: bool = False) -> tuple[list[Toy], torch.Tensor]:
    """n random toys and their 64 px images ([-1, 1]), deterministic from `seed`. With `specks` > 0 that
    fraction of the images gets 2..8 freckle-like dots on the background (drawn from a separate stream,
    so the toys themselves are the same as with specks=0); with `toy_specks` those images also get 1..6
    of them on the toy, at random light-stripe rows (another stream: the background dots stay the same)."""
    rng = random.Random(seed)
    toys = [random_toy(rng) for _ in range(n)]
    if specks > 0:
        srng, trng = random.Random(f"specks-{seed}"), random.Random(f"toy-specks-{seed}")
        toys = [dataclasses.replace(t, specks=background_points(srng, t, srng.randint(2, 8)))
                if srng.random() < specks else t for t in toys]
        if toy_specks:
            toys = [dataclasses.replace(t, freckles=interior_points(trng, t, trng.randint(1, 6))) if t.specks else t
                    for t in toys]
    return toys, to_tensor([render(t) for t in toys])


def _far(p, points, gap: float) -> bool:
    return all((p[0] - q[0]) ** 2 + (p[1] - q[1]) ** 2 >= gap * gap for q in points)


def interior_points(rng: random.Random, toy: Toy, n: int = FRECKLES, margin: float = 3.0) -> tuple:
    """n freckle positions inside the toy (at least `margin` px from its edge, clear of the emblem),
    FRECKLE_GAP apart; fewer if the shape has no room."""
    cov = coverage(toy.shape, toy.cx, toy.cy, toy.size, HI * 4)  # 0.25 px grid
    # a dot sits on a light stripe (dark on dark would be invisible at 64 px and tell nothing at 16 px)
    ex, ey = shape_centroid(toy.shape, toy.cx, toy.cy, toy.size)
    keep_out = EMBLEM_FRACTION * toy.size + 3.0 if toy.emblem else 0.0
    pts = []
    for _ in range(400):
        if len(pts) == n:
            break
        p = (rng.uniform(0, HI), rng.uniform(0, HI))
        p = (p[0], STRIPE_PERIOD * (p[1] // STRIPE_PERIOD) + STRIPE_PERIOD / 4)  # on a light stripe's centre row
        if (p[0] - ex) ** 2 + (p[1] - ey) ** 2 < keep_out ** 2 or not _far(p, pts, FRECKLE_GAP):
            continue
        m, x, y = int(margin * 4), int(p[0] * 4), int(p[1] * 4)
        if y - m >= 0 and x - m >= 0 and cov[y - m:y + m + 1, x - m:x + m + 1].min() > 0.99:
            pts.append((round(p[0], 2), round(p[1], 2)))
    return tuple(pts)


def background_points(rng: random.Random, toy: Toy, n: int, margin: float = 3.0) -> tuple:
    """n speck positions on the background, `margin` px clear of the toy and the canvas edge."""
    cov = coverage(toy.shape, toy.cx, toy.cy, toy.size, HI * 2)  # 0.5 px grid
    pts = []
    for _ in range(400):
        if len(pts) == n:
            break
        p = (rng.uniform(margin, HI - margin), rng.uniform(margin, HI - margin))
        m, x, y = int(margin * 2), int(p[0] * 2), int(p[1] * 2)
        if cov[max(0, y - m):y + m + 1, max(0, x - m):x + m + 1].max() < 0.01 and _far(p, pts, FRECKLE_GAP):
            pts.append((round(p[0], 2), round(p[1], 2)))
    return tuple(pts)


# The subject: one particular toy, with an emblem no toy of the class shows.
SUBJECT = dict(colour="purple", shape="square", pattern="striped")
SUBJECT_WORDS = "a purple striped square toy with a black centre spot"
SUBJECT_POSES = [(32.0, 32.0, 38.0), (24.0, 26.0, 30.0), (40.0, 38.0, 33.0), (27.0, 39.0, 36.0), (38.0, 25.0, 28.0)]


def subject_toy(cx: float, cy: float, size: float, freckle_seed) -> Toy:
    """The subject in one pose, with its freckles at positions drawn from `freckle_seed` (per photo)."""
    t = Toy(**SUBJECT, cx=cx, cy=cy, size=size, emblem=True)
    return dataclasses.replace(t, freckles=interior_points(random.Random(f"freckles-{freckle_seed}"), t))


def subject_toys() -> list[Toy]:
    return [subject_toy(x, y, s, i) for i, (x, y, s) in enumerate(SUBJECT_POSES)]


def fresh_subject_toys(n: int, seed: int) -> list[Toy]:
    """n new views of the subject (poses and freckles never in its photos): held-out ground truth."""
    rng = random.Random(f"fresh-subject-{seed}")
    out = []
    for i in range(n):
        size = rng.uniform(28.0, 38.0)
        m = size / 2 + 3
        out.append(subject_toy(rng.uniform(m, HI - m), rng.uniform(m, HI - m), size, f"fresh-{seed}-{i}"))
    return out


def subject_photos() -> list[Image.Image]:
    """The subject's 5 "photos" (64 px) in different positions and sizes."""
    return [render(t) for t in subject_toys()]
