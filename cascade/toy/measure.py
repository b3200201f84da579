"""Reader-based measures of the toy cascade's samples, shared by the demo, the study and the tests.

- subject fidelity: fraction of samples that show the subject's colour and shape (stage I, 16 px);
  at 64 px also its stripe pattern and its emblem;
- drift: fraction of "a toy" samples that take the subject's colour+shape, and the entropy (bits)
  of the (colour, shape) pairs across them (diversity; the uniform prior has log2(24) = 4.58 bits).
"""
from __future__ import annotations

import math
import random
from collections import Counter
from pathlib import Path

import torch

from cascade.toy import readers, world


def write_subject(folder: Path) -> Path:
    """The subject's photos (64 px PNGs, each with its glyph placed anew: glyph.photos) into `folder` (created)."""
    from cascade.toy import glyph

    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(glyph.photos()):
        im.save(folder / f"subject-{i:02d}.png")
    return folder


def is_world_subject(folder: str | Path) -> bool:
    """Whether every photo in `folder` shows the toy world's own subject (its colour, shape, stripes and
    centre spot, read at 64 px). The readers score only that subject: on any other photos a "fidelity"
    would measure the toy subject, not the user's. A folder that cannot be read is not the subject."""
    from stages import data, photos

    try:
        scan = photos.scan_folder(Path(folder))
        images = [photos.open_photo(p) for p in scan.images]
    except photos.READ_ERRORS:
        return False
    if not images:
        return False
    want = {**world.SUBJECT, "emblem": True}
    return all(readers.read(im) == want for im in data.stack(images, world.HI))


def is_subject(img) -> bool:
    c, s = readers.locate(img)[:2]
    return c == world.SUBJECT["colour"] and s == world.SUBJECT["shape"]


def fidelity(images: torch.Tensor) -> float:
    """Fraction of images with the subject's colour and shape."""
    return sum(is_subject(im) for im in images) / max(1, len(images))


def detail(images: torch.Tensor) -> dict:
    """64 px images: fractions showing the subject's stripes, its emblem, and both with colour+shape."""
    n = max(1, len(images))
    reads = [readers.read(im) for im in images]
    stripes = sum(r.get("pattern") == world.SUBJECT["pattern"] for r in reads) / n
    emblem = sum(bool(r.get("emblem")) for r in reads) / n
    full = sum(r["colour"] == world.SUBJECT["colour"] and r["shape"] == world.SUBJECT["shape"]
               and r.get("pattern") == world.SUBJECT["pattern"] for r in reads) / n
    return {"stripes": stripes, "emblem": emblem, "subject_with_stripes": full}


def study_readers() -> dict:
    """Per-image readers for `cascade study-sr` on the toy world (1.0 = shown): the subject's stripes
    and its emblem, the detail only the SR stage can draw."""
    return {"stripes": lambda im: float(readers.read(im).get("pattern") == world.SUBJECT["pattern"]),
            "emblem": lambda im: float(bool(readers.read(im).get("emblem")))}


def other_toys(n: int, seed: int, patterns=("plain", "striped")) -> list:
    """n toys that are not the subject: random colour and shape other than the subject's pair, of
    `patterns` (not dotted: its own dots would read as freckles; striped only for the glyph, which
    reads as a place where the stripes stop), never freckled."""
    rng = random.Random(f"other-toys-{seed}")
    out = []
    while len(out) < n:
        t = world.random_toy(rng, pattern=rng.choice(patterns))
        if (t.colour, t.shape) != (world.SUBJECT["colour"], world.SUBJECT["shape"]):
            out.append(t)
    return out


FRESH_VIEWS, OTHER_TOYS = 6, 6


def study_extras(req, fresh: int = FRESH_VIEWS, others: int = OTHER_TOYS):
    """The toy world's additions to a `cascade study-sr` request (issue 28: the subject's glyph): its
    readers (stripes, emblem, glyph drawn anywhere), the glyph's placement and drawing against the
    truth (glyph_read), `fresh` new views of the subject with the glyph (glyph.subject_views, seed 1)
    as held-out ground truth, and `others` renders of other striped toys as drift inputs."""
    from cascade.toy import glyph, glyph_read

    req.readers = {**study_readers(), "glyph": glyph_read.glyph_anywhere}
    req.truth_readers = {"glyph_hit": glyph_read.glyph_hit, "glyph_drawn": glyph_read.glyph_drawn}
    req.fresh_views = world.to_tensor([world.render(t) for t in glyph.subject_views(fresh, 1)]) if fresh else None
    req.class_inputs = world.to_lowres(world.to_tensor([world.render(t) for t in other_toys(others, 0, ("striped",))])) \
        if others else None
    return req


def entropy(images: torch.Tensor) -> float:
    """Entropy (bits) of the read (colour, shape) pairs: the class prior's diversity."""
    counts = Counter(tuple(readers.locate(im)[:2]) for im in images)
    n = sum(counts.values())
    return -sum(c / n * math.log2(c / n) for c in counts.values()) if n else 0.0


def drift(images: torch.Tensor) -> dict:
    """For "a toy" samples: how many took the subject's colour+shape, and their diversity."""
    return {"subject_share": fidelity(images), "entropy_bits": entropy(images)}


_ENCODERS: dict = {}


def _encoder(cfg):
    """The config's text encoder, resolved and built once per process (resolving the toy weights
    re-hashes them, and a new encoder would reload T5 and its embedding cache)."""
    from cascade import models
    from cascade.text import TextEncoder

    m = cfg.models
    key = (m.stage1, m.text_encoder, m.cache_dir, cfg.max_text_length)
    if key not in _ENCODERS:
        _ENCODERS[key] = TextEncoder(models.resolve_text_encoder(cfg), m.cache_dir, cfg.max_text_length)
    return _ENCODERS[key]


def sample_prompt(stage1: str, cfg, prompt: str, seeds: list[int]) -> torch.Tensor:
    """Stage I samples of one prompt ("[V]" filled from a fine-tuned export) for the given seeds."""
    from cascade import runner

    prompt = runner.fill_identifier(prompt, stage1)
    emb = _encoder(cfg).encode([prompt, ""])
    return runner.run_stage1(stage1, cfg, emb[prompt].expand(len(seeds), -1, -1), emb[""], seeds)
