"""Which weights each stage uses: "tiny" resolves to the locally built tiny components; anything
else is a hub id or a local folder, passed to `from_pretrained` unchanged."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from cascade.config import Config
from cascade.tiny import TINY_VERSION, tiny_root
from stages.components import DTYPES, describe_source


@dataclass
class ModelPaths:
    stage1: str
    stage2: str
    stage3: str  # "none" when the cascade stops at 256
    text_encoder: str

    @property
    def uses_tiny(self) -> bool:
        return any(TINY_VERSION in describe_source(p).base for p in (self.stage1, self.stage2, self.text_encoder))


def resolve_name(cfg: Config, name: str, which: str) -> str:
    """"tiny" -> the built tiny folder for `which` (stage1|stage2|stage3); "none" and paths unchanged."""
    if name == "tiny":
        return str(tiny_root(cfg.models.cache_dir) / which)
    if name == "toy":  # the committed, pretrained toy cascade (checksum-verified)
        from cascade.toy.weights import toy_root

        return str(toy_root() / which)
    if name != "none" and not Path(name).exists() and (name.count("/") != 1 or name.startswith((".", "/"))):
        raise FileNotFoundError(f"models.{which}: {name} is neither an existing folder nor a hub id (owner/name)")
    return name


def resolve(cfg: Config) -> ModelPaths:
    m = cfg.models
    s1 = resolve_name(cfg, m.stage1, "stage1")
    text = resolve_name(cfg, m.text_encoder, "stage1") if m.text_encoder else describe_source(s1).base
    return ModelPaths(s1, resolve_name(cfg, m.stage2, "stage2"), resolve_name(cfg, m.stage3, "stage3"), text)


def text_encoder_device(cfg: Config) -> str | None:
    """Where T5 runs: None = the GPU when there is one (TextEncoder's default), or "cpu"."""
    return None if cfg.models.text_encoder_device == "auto" else cfg.models.text_encoder_device


def weights_dtype(cfg: Config) -> torch.dtype:
    """Frozen (sampling) dtype; half precision only where a GPU runs it."""
    dtype = DTYPES[cfg.models.dtype]
    return dtype if torch.cuda.is_available() else torch.float32
