"""The SR study's grid as text (flags and the config's `study:` section): noise levels "0,20,250", seeds
"0,1,2", variants "aug0=0:0 aug250=250:250:prior". Each parser raises ValueError with what is wrong;
the caller names the flag or config key."""
from __future__ import annotations


def levels(text: str) -> list[int]:
    try:
        out = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"expected integers separated by commas, got {text!r}") from None
    if not out or any(not 0 <= v <= 999 for v in out):
        raise ValueError(f"expected integers in 0..999 separated by commas, got {text!r}")
    return out


def seeds(text: str) -> list[int]:
    try:
        out = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        out = []
    if not out or any(s < 0 for s in out):
        raise ValueError(f"expected non-negative integers separated by commas, got {text!r}")
    return out


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
