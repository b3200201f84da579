"""The optimizers beyond AdamW (train.optimizer): Adafactor (transformers) and Prodigy (prodigyopt,
the optional extra `[prodigy]`). Each is refused in one line when its package is missing, before
any model loads (setup.early_checks) and again where it is built.

- Adafactor with a fixed learning rate (relative_step=False, scale_parameter=False, no warmup_init),
  so train.learning_rate and the LR schedule drive it like AdamW; its factored second moment holds
  a row and a column vector per matrix instead of a full-size tensor (far less optimizer memory).
- Prodigy estimates the step size itself: train.learning_rate is a multiplier on that estimate and
  should be ~1.0; the schedule still scales it."""
from __future__ import annotations

import importlib.util
import logging

from stages.errors import InputError

log = logging.getLogger(__name__)

# 8-bit AdamW (torchao's or bitsandbytes') is checked in setup.early_checks
PACKAGES = {"adafactor": ("transformers", "pip install transformers"),
            "prodigy": ("prodigyopt", "pip install 'cascade-dreambooth[prodigy]'")}


def check_available(name: str):
    """One-line refusal when the package an optimizer needs is not installed."""
    if name in PACKAGES:
        package, how = PACKAGES[name]
        if importlib.util.find_spec(package) is None:
            raise InputError(f"train.optimizer={name} needs the {package} package: {how}")


def make_extra(params, cfg):
    """(optimizer, name) for optimizer=adafactor|prodigy."""
    name = cfg.optimizer
    check_available(name)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, scale_parameter=False,
                         relative_step=False, warmup_init=False), "adafactor"
    if name == "prodigy":
        from prodigyopt import Prodigy

        if cfg.learning_rate < 0.1:
            log.warning("optimizer=prodigy estimates the step size itself; learning_rate=%g scales that estimate "
                        "(1.0 is the usual setting)", cfg.learning_rate)
        return Prodigy(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay), "prodigy"
    raise ValueError(f"not an extra optimizer: {name!r}")
