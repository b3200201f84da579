"""Typed command-line flags, checked where argparse parses them: a bad value is one line
(`cascade CMD: error: argument --flag: ...`, exit 2) before anything runs.

Every float flag is finite (`nan`/`inf` are refused: they would reach JSON as invalid `NaN`), every
count has its lower bound, and a seed fits the samplers' 64-bit generators with room for the
per-image and per-stage offsets added to it."""
from __future__ import annotations

import argparse
import math

from cascade.config import SEED_MAX


def _parse(text: str, kind):
    try:
        return kind(text)
    except (TypeError, ValueError):
        name = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"expected {name}, got {text!r}") from None


def number(kind=float, low: float | None = None, high: float | None = None, low_open: bool = False,
           high_open: bool = False):
    """An argparse `type=` for an int or a finite float in [low, high] (open ends where asked)."""

    def convert(text: str):
        value = _parse(text, kind)
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        below = low is not None and (value <= low if low_open else value < low)
        above = high is not None and (value >= high if high_open else value > high)
        if below or above:
            if low is not None and high is not None and not (low_open or high_open) and kind is int:
                rule = f"an integer in {low}..{high}"
            else:
                rule = " and ".join(r for r in (low is not None and f"{'>' if low_open else '>='} {low}",
                                                high is not None and f"{'<' if high_open else '<='} {high}") if r)
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text!r}")
        return value

    convert.__name__ = kind.__name__  # argparse names the type in its own messages
    return convert


def count(low: int = 1):
    """An integer >= low (1: a number of images, steps, threads...)."""
    return number(int, low)


def finite(low: float | None = None, high: float | None = None, **kw):
    return number(float, low, high, **kw)


seed = number(int, 0, SEED_MAX)
noise_level = number(int, 0, 999)


def boolean(text: str) -> bool:
    """true/false (also yes/no, 1/0) for a flag that carries a config's bool."""
    value = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}.get(text.lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return value
