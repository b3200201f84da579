"""The SR study's grid as text (flags and the config's `study:` section): noise levels "0,20,250", seeds
"0,1,2", variants "aug0=0:0 aug250=250:250:prior". Each parser raises ValueError with what is wrong;
the caller names the flag or config key. Lists are refused whole before anything runs: an empty item
("0,,5" is a typo, not "0,5"), a value out of range, or one given twice (a repeated seed would fail
only after the whole first sweep, when its run folder already exists)."""
from __future__ import annotations

from cascade.config import SEED_MAX


def _integers(text, low: int, high: int) -> list[int]:
    items = [x.strip() for x in str(text).split(",")]
    try:
        out = [int(x) for x in items]
    except ValueError:
        raise ValueError(f"expected integers in {low}..{high} separated by commas (no empty items), "
                         f"got {text!r}") from None
    if any(not low <= v <= high for v in out):
        raise ValueError(f"expected integers in {low}..{high} separated by commas, got {text!r}")
    twice = sorted({v for v in out if out.count(v) > 1})
    if twice:
        raise ValueError(f"{', '.join(map(str, twice))} given twice in {text!r}: give each value once")
    return out


def levels(text: str) -> list[int]:
    return _integers(text, 0, 999)


def seeds(text: str) -> list[int]:
    return _integers(text, 0, SEED_MAX)


def variants(items: list[str]) -> list[tuple[str, int, int, bool]]:
    """NAME=MIN:MAX[:prior] items -> (name, min, max, prior preservation)."""
    out = []
    for item in items:
        name, _, rng = item.partition("=")
        lo, _, rest = rng.partition(":")
        hi, _, flag = rest.partition(":")
        try:
            lo_i, hi_i = int(lo), int(hi or lo)
        except ValueError:
            raise ValueError(f"{item!r}: expected NAME=MIN:MAX[:prior] with integer levels") from None
        if not name or not 0 <= lo_i <= hi_i <= 999 or flag not in ("", "prior"):
            raise ValueError(f"{item!r}: expected NAME=MIN:MAX[:prior] with 0 <= MIN <= MAX <= 999")
        out.append((name, lo_i, hi_i, flag == "prior"))
    if not out:
        raise ValueError("no variant given")
    if len({v[0] for v in out}) < len(out):
        raise ValueError(f"variant names repeat: {' '.join(items)}")
    return out
