"""Load one stage's UNet and schedulers from a hub id, a local diffusers folder, or our export.

An export folder (written by `checkpoint.export`) carries `cascade.json` naming its base model:
full exports hold `unet/` (+ `scheduler/`), LoRA exports hold the adapter weights that
`load_lora_weights` reads. Either way the stage is the base pipeline folder plus what we trained.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from stages.errors import InputError

EXPORT_META = "cascade.json"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
STAGE_IN_CHANNELS = {1: 3, 2: 6}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class StageMismatchError(InputError):
    """A stage I model given where a stage II one is expected, or vice versa."""


@dataclass
class StageSource:
    """Where a stage's weights come from: a base model, plus an optional fine-tuned export."""
    base: str
    export: Path | None = None
    kind: str = "base"  # base | full | lora
    meta: dict | None = None


def portable_base(base: str, export: Path) -> str:
    """How an export records its base model without a local absolute path (an upload would carry it):
    a hub id as it is, a folder under the home directory as `~/...`, any other folder relative to the
    export (`../...`). `describe_source` reads all three back (and absolute paths of older exports)."""
    folder = Path(base).expanduser()
    if not folder.exists():
        return base  # a hub id
    folder, home = folder.resolve(), Path.home().resolve()
    if folder.is_relative_to(home) and not Path(export).resolve().is_relative_to(home):
        return "~/" + folder.relative_to(home).as_posix()
    return Path(os.path.relpath(folder, Path(export).resolve())).as_posix()


def _read_base(base: str, export: Path) -> str:
    if base.startswith("~"):
        return str(Path(base).expanduser())
    if base.startswith(".."):
        return str((export / base).resolve())
    return base


def describe_source(path: str) -> StageSource:
    p = Path(path)
    meta_file = p / EXPORT_META
    if meta_file.is_file():
        meta = json.loads(meta_file.read_text())
        return StageSource(base=_read_base(meta["base"], p), export=p, kind=meta["kind"], meta=meta)
    return StageSource(base=str(path))


def unet_stage(in_channels: int) -> int:
    """1 for base models (3 input channels), 2 for super-resolution (6: x_t + low-res condition)."""
    for stage, ch in STAGE_IN_CHANNELS.items():
        if in_channels == ch:
            return stage
    raise StageMismatchError(f"UNet with in_channels={in_channels} is neither an IF stage I (3) "
                             f"nor stage II (6) model")


def read_unet_config(path: str, setting: str) -> dict:
    """The stage's unet/config.json only (no weights): from the folder, the export, or the hub cache."""
    from diffusers import UNet2DConditionModel

    src = describe_source(path)
    folder = src.export if src.kind == "full" else src.base
    try:
        return UNet2DConditionModel.load_config(folder, subfolder="unet")
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"{setting}: cannot read a UNet config from {folder} ({e})") from None


def stage_resolution(path: str, setting: str) -> int:
    """The square image size the stage's UNet works at: its config's `sample_size` (64 for IF-I,
    256 for IF-II), read without loading weights."""
    size = read_unet_config(path, setting).get("sample_size")
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise StageMismatchError(f"{setting}: {path} has a non-square UNet sample_size {list(size)}")
        size = size[0]
    if not isinstance(size, int) or size < 1:
        raise StageMismatchError(f"{setting}: {path} has no usable UNet sample_size ({size!r})")
    return size


def check_stage(path: str, expected: int, setting: str):
    """Read only the UNet config (cheap) and fail early if it is the wrong stage."""
    src = describe_source(path)
    if src.meta is not None and src.meta.get("stage") != expected:
        raise StageMismatchError(f"{setting}: {path} is a stage {src.meta.get('stage')} export, "
                                 f"but stage {expected} is expected")
    config = read_unet_config(path, setting)
    found = unet_stage(config["in_channels"])
    if found != expected:
        raise StageMismatchError(f"{setting}: {path} holds a stage {found} UNet (in_channels="
                                 f"{config['in_channels']}), but stage {expected} is expected")


def load_unet(path: str, dtype: torch.dtype = torch.float32, variant: str | None = None, lora: bool = True):
    """The stage's UNet: the base weights, a full export's weights, or base + a LoRA export (fused
    by diffusers' own loader)."""
    from diffusers import UNet2DConditionModel

    src = describe_source(path)
    if src.kind == "full":
        return UNet2DConditionModel.from_pretrained(src.export, subfolder="unet", dtype=dtype,
                                                    variant=(src.meta or {}).get("variant"))
    unet = UNet2DConditionModel.from_pretrained(src.base, subfolder="unet", dtype=dtype, variant=variant)
    if src.kind == "lora" and lora:
        unet.load_lora_adapter(str(src.export), weight_name=LORA_WEIGHTS, prefix="unet")
    return unet


def load_scheduler(path: str, subfolder: str = "scheduler"):
    from diffusers import DDPMScheduler

    src = describe_source(path)
    if src.export is not None and (src.export / subfolder).is_dir():
        return DDPMScheduler.from_pretrained(src.export, subfolder=subfolder)
    return DDPMScheduler.from_pretrained(src.base, subfolder=subfolder)


def file_digest(path: Path, limit: int = 1 << 30) -> str:
    """sha256 of a weights file (first GiB), to record which checkpoint made an image."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(limit))
    return h.hexdigest()[:16]
