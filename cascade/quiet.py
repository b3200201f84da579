"""Third-party console notices that say nothing to a cascade user, silenced at the source in every
process (imported by the package, so spawned workers get it too):

- DeepSpeed's "Setting accelerator to CPU ... unable to detect it" (on a machine without CUDA,
  DS_ACCELERATOR=cpu tells it what it would pick anyway);
- bitsandbytes' optional-kernel notices ("Failed to load CPU gemm_4bit_forward from kernels-community");
- transformers' "`ViTImageProcessor` requires torchvision (not installed); falling back to ..."
  (the PIL processors are the ones cascade means to use; torchvision is not a dependency).

Warnings that matter (a model's missing weights, a deprecated argument) are left alone.
"""
from __future__ import annotations

import logging
import os

DROPPED = ("requires torchvision (not installed)",)


class _Drop(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record is not ours to judge
            return True
        return not any(d in text for d in DROPPED)


def install():
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    for name in ("transformers.utils.import_utils", "transformers.image_processing_utils"):
        log = logging.getLogger(name)
        if not any(isinstance(f, _Drop) for f in log.filters):
            log.addFilter(_Drop())


def no_cuda_for_deepspeed():
    """Before DeepSpeed is imported: where torch sees no CUDA device, say so (its own fallback)."""
    if "DS_ACCELERATOR" in os.environ:
        return
    import torch

    if not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
