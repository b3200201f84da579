"""Which resolution each stage works at, read from the models' UNet configs (no weights loaded).

Stage I: its UNet's `sample_size` (IF: 64; a toy cascade: e.g. 16). Stage II: its own UNet's
`sample_size` (IF: 256) for the high-res side; the low-res side is stage I's size, because at
sampling time stage II upsamples what stage I made. When stage I's config cannot be read (e.g. a
hub id not in the local cache while training stage II alone), the low-res size comes from a stage
II export's metadata (`lowres_size`), else from IF's 4x rule (sample_size // 4), with a warning.
"""
from __future__ import annotations

import logging

from stages import components
from stages.errors import InputError
from stages.stage2 import SR_FACTOR

log = logging.getLogger(__name__)


def stage1_size(path: str) -> int:
    return components.stage_resolution(path, f"stage I model ({path})")


def stage2_sizes(stage2: str, stage1: str) -> tuple[int, int]:
    """(high-res, low-res) sizes of stage II in the cascade whose stage I is `stage1`."""
    high = components.stage_resolution(stage2, f"stage II model ({stage2})")
    try:
        low = stage1_size(stage1)
    except (OSError, InputError) as e:
        meta = components.describe_source(stage2).meta or {}
        low = int(meta.get("lowres_size", high // SR_FACTOR))
        log.warning("stage I's resolution unknown (%s); stage II low-res size %d (%s)", e, low,
                    "from its export" if "lowres_size" in meta else f"sample_size / {SR_FACTOR}, IF's ratio")
    if not 0 < low < high:
        raise InputError(f"stage II ({stage2}, {high}px) cannot upsample stage I's {low}px images "
                         f"({stage1}): the low-res size must be below the high-res one")
    return high, low


def check_cascade(stage1: str, stage2: str) -> tuple[int, int | None]:
    """Before sampling (configs only): each model is of its stage; stage II must upsample stage I's
    size, and an export trained at another low-res size is refused. Returns (stage I size, stage II
    size or None)."""
    components.check_stage(stage1, 1, "stage I model")
    if stage2 != "none":
        components.check_stage(stage2, 2, "stage II model")
    low = stage1_size(stage1)
    if stage2 == "none":
        return low, None
    trained = (components.describe_source(stage2).meta or {}).get("lowres_size")
    if trained is not None and int(trained) != low:
        raise InputError(f"stage II export {stage2} was trained to upsample {trained}px images, but stage I "
                         f"({stage1}) makes {low}px ones")
    high, _ = stage2_sizes(stage2, stage1)
    return low, high
