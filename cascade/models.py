"""Which weights each stage uses: "tiny" resolves to the locally built tiny components; anything
else is a hub id or a local folder, passed to `from_pretrained` unchanged."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from cascade.config import Config
from cascade.tiny import tiny_root
from stages.components import DTYPES, describe_source


@dataclass
class ModelPaths:
    stage1: str
    stage2: str
    stage3: str  # "none" when the cascade stops at 256
    text_encoder: str

    @property
    def uses_tiny(self) -> bool:
        return any("tiny-v1" in p for p in (self.stage1, self.stage2, self.text_encoder))


def resolve(cfg: Config) -> ModelPaths:
    m = cfg.models

    def one(name: str, which: str) -> str:
        return str(tiny_root(m.cache_dir) / which) if name == "tiny" else name

    s1 = one(m.stage1, "stage1")
    text = one(m.text_encoder, "stage1") if m.text_encoder else describe_source(s1).base
    return ModelPaths(s1, one(m.stage2, "stage2"), "none" if m.stage3 == "none" else one(m.stage3, "stage3"), text)


def weights_dtype(cfg: Config) -> torch.dtype:
    """Frozen (sampling) dtype; half precision only where a GPU runs it."""
    dtype = DTYPES[cfg.models.dtype]
    return dtype if torch.cuda.is_available() else torch.float32
