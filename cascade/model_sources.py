"""Named model sources: a short name (`tiny`, `toy`) that stands for a folder of stage components
(stage1/, stage2/, stage3/) which a package above the core provides.

The core keeps only this table. The packages that own the weights fill it through the
`cascade.model_sources` entry points declared in pyproject.toml, loaded by name on first use, so the
core never imports the offline or toy packages (and another installed package can add a source).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from importlib.metadata import entry_points
from typing import Callable
from pathlib import Path

GROUP = "cascade.model_sources"


@dataclass(frozen=True)
class Source:
    root: Callable[[str], Path]  # models.cache_dir -> the folder holding stage1/, stage2/ (, stage3/)
    marker: str  # text in the path of every folder of this source (recognises resolved paths and exports' bases)
    random_weights: bool  # True: random-initialised components, their images are noise


@lru_cache(maxsize=None)
def _entry_points() -> dict:
    return {ep.name: ep for ep in entry_points(group=GROUP)}


@lru_cache(maxsize=None)
def get(name: str) -> Source | None:
    """The source registered under `name`, or None when no package provides one."""
    ep = _entry_points().get(name)
    return ep.load() if ep is not None else None


def names() -> list[str]:
    return sorted(_entry_points())


def random_weights(path: str) -> bool:
    """Whether a resolved model path lies in a source of random-initialised components."""
    return any(src.random_weights and src.marker in str(path) for src in map(get, names()) if src is not None)
