"""The real DeepFloyd IF architectures (IF-I-M/L/XL, IF-II-M/L) and the T5 v1.1 XXL encoder, built
without weights (meta device or FakeTensorMode) for memory planning and random-weight benchmarks.

The configs ship as package data in cascade/perf/if_configs/*.json; each file's "source" and "provenance" say where its
numbers come from. No download is needed or attempted."""
from __future__ import annotations

import json
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import torch

CONFIG_DIR = Path(__file__).resolve().parent / "if_configs"
UNETS = ("if-i-m", "if-i-l", "if-i-xl", "if-ii-m", "if-ii-l")
T5 = "t5-v1_1-xxl"
# the hub ids our presets name -> shipped architecture
HUB_TO_ARCH = {"DeepFloyd/IF-I-M-v1.0": "if-i-m", "DeepFloyd/IF-I-L-v1.0": "if-i-l",
               "DeepFloyd/IF-I-XL-v1.0": "if-i-xl", "DeepFloyd/IF-II-M-v1.0": "if-ii-m",
               "DeepFloyd/IF-II-L-v1.0": "if-ii-l"}


@lru_cache(maxsize=None)
def load(name: str) -> dict:
    path = CONFIG_DIR / f"{name}.json"
    if not path.is_file():
        from stages.errors import InputError

        raise InputError(f"unknown architecture '{name}'; known: {', '.join(UNETS + (T5,))}")
    return json.loads(path.read_text())


def unet_config(name: str) -> dict:
    return {k: v for k, v in load(name)["unet"].items() if not k.startswith("_")}


@contextmanager
def default_dtype(dtype: torch.dtype):
    """Modules built inside get their weights in `dtype` directly: no transient fp32 copy (as
    from_pretrained(torch_dtype=) loads them)."""
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(saved)


def build_unet(name: str, device: str | torch.device = "meta", dtype: torch.dtype = torch.float32):
    """The UNet with uninitialised (meta) or random weights; build under FakeTensorMode for fake ones."""
    from diffusers import UNet2DConditionModel

    with torch.device(device), default_dtype(dtype):
        return UNet2DConditionModel(**unet_config(name))


def build_t5(device: str | torch.device = "meta", dtype: torch.dtype = torch.float32):
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(**load(T5)["t5"])
    with torch.device(device), default_dtype(dtype):
        model = T5EncoderModel(cfg)
    return keep_in_fp32(model, dtype)


def keep_in_fp32(model, dtype: torch.dtype):
    """What from_pretrained does: a model's `_keep_in_fp32_modules` (T5's feed-forward output
    projections `wo`, 1.0B of T5-XXL's 4.76B parameters) stay fp32 when it loads in fp16 (not bf16)."""
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    if dtype == torch.float16 and keep:
        for name, module in model.named_modules():
            if keep & set(name.split(".")):
                module.to(torch.float32)
    return model


def n_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def arch_for(model_id: str) -> str | None:
    """The shipped architecture of a hub id / preset model name ('tiny' and local folders: None)."""
    return HUB_TO_ARCH.get(model_id) or (model_id if model_id in UNETS else None)
