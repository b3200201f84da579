"""Which weights each stage uses: a registered source name (`tiny`: the locally built tiny
components; `toy`: the committed toy cascade; see cascade.model_sources) resolves to its folder;
anything else is a hub id or a local folder, passed to `from_pretrained` unchanged."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from cascade import model_sources
from cascade.config import Config
from stages.components import DTYPES, describe_source


@dataclass
class ModelPaths:
    stage1: str
    stage2: str
    stage3: str  # "none" when the cascade stops at 256
    text_encoder: str

    @property
    def uses_tiny(self) -> bool:
        return any(model_sources.random_weights(describe_source(p).base)
                   for p in (self.stage1, self.stage2, self.text_encoder))


def resolve_name(cfg: Config, name: str, which: str) -> str:
    """A source name -> its folder for `which` (stage1|stage2|stage3); "none" and paths unchanged."""
    source = model_sources.get(name) if "/" not in name else None
    if source is not None:
        return str(source.root(cfg.models.cache_dir) / which)
    if name != "none" and not Path(name).exists() and (name.count("/") != 1 or name.startswith((".", "/"))):
        raise FileNotFoundError(f"models.{which}: {name} is neither an existing folder, a hub id (owner/name) nor a "
                                f"model source ({', '.join(model_sources.names()) or 'none registered: reinstall the package'})")
    return name


def resolve_text_encoder(cfg: Config, stage1: str | None = None) -> str:
    """The text encoder's source: `models.text_encoder`, else the base of stage I's model."""
    m = cfg.models
    if m.text_encoder:
        return resolve_name(cfg, m.text_encoder, "stage1")
    return describe_source(stage1 or resolve_name(cfg, m.stage1, "stage1")).base


def resolve(cfg: Config) -> ModelPaths:
    m = cfg.models
    s1 = resolve_name(cfg, m.stage1, "stage1")
    return ModelPaths(s1, resolve_name(cfg, m.stage2, "stage2"), resolve_name(cfg, m.stage3, "stage3"),
                      resolve_text_encoder(cfg, s1))


def text_encoder_device(cfg: Config) -> str | None:
    """Where T5 runs: None = the GPU when there is one (TextEncoder's default), or "cpu"."""
    return None if cfg.models.text_encoder_device == "auto" else cfg.models.text_encoder_device


def weights_dtype(cfg: Config) -> torch.dtype:
    """Frozen (sampling) dtype; half precision only where a GPU runs it."""
    dtype = DTYPES[cfg.models.dtype]
    return dtype if torch.cuda.is_available() else torch.float32
