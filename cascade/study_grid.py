"""The SR study's grid as text (flags and the config's `study:` section): noise levels "0,20,250", seeds
"0,1,2", variants "aug0=0:0 aug250=250:250:prior". Each parser raises ValueError with what is wrong;
the caller names the flag or config key. Lists are refused whole before anything runs: an empty item
("0,,5" is a typo, not "0,5"), a value out of range, or one given twice (a repeated seed would fail
only after the whole first sweep, when its run folder already exists). `steps` decides between the
study's step counts and the user's stage2.* ones."""
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


# the study's settings that stand in for a stage II one: (study key, stage II key, flag)
STEP_SETTINGS = (("max_steps", "stage2.train.max_steps", "--max-steps"), ("sample_steps", "stage2.sample.steps", None))


def steps(cfg, given: dict, flags: dict) -> list[str]:
    """Apply study.max_steps / study.sample_steps to cfg.stage2 where they win, and return one line per
    setting saying which value applies and why. A flag wins; else the study's value (0 = none) wins
    unless the stage II setting was given more directly (config.given_keys ranks: dataclass default 0,
    config file 1, --set 2), so a user YAML without a `study:` section keeps its stage2.* settings."""
    lines = []
    for key, stage_key, flag in STEP_SETTINGS:
        section, *path, last = stage_key.split(".")
        holder = getattr(cfg, section)
        for part in path:
            holder = getattr(holder, part)
        mine = getattr(holder, last)
        value, rank, source = flags.get(flag), 3, flag
        if value is None:
            value = getattr(cfg.study, key)
            rank, source = given.get(f"study.{key}", (0, "default"))
            source = f"study.{key} ({source})"
        stage_rank, stage_source = given.get(stage_key, (0, "default"))
        if value and rank >= stage_rank:
            setattr(holder, last, value)
            lines.append(f"{stage_key} = {value} from {source}"
                         + (f", not {mine} ({stage_source})" if value != mine else ""))
        else:
            why = "0 = use stage II's" if not value else f"{stage_source} is given more directly"
            lines.append(f"{stage_key} = {mine} ({stage_source}); {source} = {value} not applied ({why})")
    return lines
