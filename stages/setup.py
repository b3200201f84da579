"""What the training loop needs before step 1: precision, attention, LoRA, optimizer, trackers.
Every GPU-only path falls back on CPU with a warning instead of failing."""
from __future__ import annotations

import importlib.util
import logging

import torch

from stages.errors import InputError

log = logging.getLogger(__name__)

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj"]  # IF's AttnAddedKV attention


def on_cpu() -> bool:
    """accelerate only forms a CPU process group (gloo, e.g. under torchrun) when told cpu=True."""
    return not torch.cuda.is_available()


def process_state(timeout_minutes: float | None = None):
    """The process state (and group) for the engine the launcher chose; see stages/engines.py."""
    from stages import engines

    return engines.process_state(timeout_minutes or engines.DEFAULT_TIMEOUT_MINUTES)


def resolve_mixed_precision(setting: str) -> str:
    if setting == "auto":
        if torch.cuda.is_available():
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "no"
    if setting == "fp16" and not torch.cuda.is_available():
        log.warning("mixed_precision=fp16 needs CUDA; training in fp32 on CPU")
        return "no"
    return setting


def set_attention(unet, attention: str):
    """SDPA is diffusers' default for IF's attention on torch 2; xformers when asked and usable."""
    if attention != "xformers":
        return "sdpa"
    if importlib.util.find_spec("xformers") is None or not torch.cuda.is_available():
        log.warning("attention=xformers needs the xformers package and CUDA; using SDPA")
        return "sdpa"
    unet.enable_xformers_memory_efficient_attention()
    return "xformers"


def lora_options(cfg) -> dict:
    """add_lora's keyword arguments from a Train section: lora_type (dora: peft's use_dora) and
    lora_targets (comma-separated module names; empty = LORA_TARGETS)."""
    targets = [n.strip() for n in getattr(cfg, "lora_targets", "").split(",") if n.strip()]
    return {"use_dora": getattr(cfg, "lora_type", "lora") == "dora", "targets": targets or None}


def add_lora(unet, rank: int, alpha: float, use_dora: bool = False, targets: list[str] | None = None):
    from peft import LoraConfig

    targets = list(targets or LORA_TARGETS)
    names = [n for n, _ in unet.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]  # peft's matching
    if missing:
        raise InputError(f"train.lora_targets: no module named {', '.join(missing)} in this UNet "
                         f"(IF's attention has {', '.join(LORA_TARGETS)})")
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian", target_modules=targets,
                        use_dora=use_dora)
    unet.requires_grad_(False)
    unet.add_adapter(config)
    return config


def make_optimizer(params, lr: float, weight_decay: float, use_8bit: bool):
    if use_8bit:
        if importlib.util.find_spec("bitsandbytes") is None:
            raise InputError("use_8bit_adam needs bitsandbytes: pip install 'cascade-dreambooth[bnb]'")
        import bitsandbytes as bnb

        if torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes.backends.cpu") is not None:
            # bitsandbytes >= 0.48 also runs its 8-bit optimizer states on CPU
            return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay), "adamw-8bit"
        log.warning("use_8bit_adam: this bitsandbytes has no CPU backend; using torch AdamW")
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay), "adamw"


def early_checks(train_cfg):
    """Optional packages a setting needs, checked before any model loads."""
    check_tracker(train_cfg.report_to)
    torchao_steps_it = train_cfg.weights_dtype == "float32" and importlib.util.find_spec("torchao") is not None
    if train_cfg.use_8bit_adam and importlib.util.find_spec("bitsandbytes") is None and not torchao_steps_it:
        raise InputError("use_8bit_adam needs bitsandbytes: pip install 'cascade-dreambooth[bnb]'" +
                         (" (or, for float32 weights, '[torchao]')" if train_cfg.weights_dtype == "float32" else ""))
    from stages.optimizers.beyond_adamw import check_available

    check_available(getattr(train_cfg, "optimizer", "adamw"))
    # which engines an option composes with is cascade/compat.py's table, checked with the config
    if getattr(train_cfg, "offload_optimizer", False) and importlib.util.find_spec("deepspeed") is None:
        raise InputError("train.offload_optimizer runs through DeepSpeed ZeRO-Offload: pip install deepspeed and "
                         "launch with accelerate launch --config_file configs/accelerate/deepspeed-zero2-offload.yaml")


def check_tracker(report_to: str):
    """Fail before training if the chosen tracker is not installed."""
    if report_to == "none":
        return None
    package = {"tensorboard": "tensorboard", "wandb": "wandb"}[report_to]
    if importlib.util.find_spec(package) is None and not (
            report_to == "tensorboard" and importlib.util.find_spec("tensorboardX")):
        raise InputError(f"report_to={report_to} needs the {package} package installed")
    return report_to
