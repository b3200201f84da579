"""Device bytes of each phase of `cascade train` (T5 encoding, class images, training, validation,
export) around the planner's traced training step, and the host copies beside them."""
from __future__ import annotations

import torch

from cascade.perf import arch
from cascade.perf.planner import trace_inference


DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def t5_device_bytes(model: str, frozen_dtype: str = "float16", placement: str = "gpu") -> int:
    """Device bytes of the text encoder while it encodes: T5 v1.1 XXL for the real models (its `wo`
    projections stay fp32 when it loads in fp16, as transformers keeps them), the tiny encoder beside
    the tiny ones. placement "cpu": none (models.text_encoder_device=cpu); "8bit": bitsandbytes int8
    Linear weights (one fp32 scale per output row), `wo` and the embedding left as they load."""
    if placement == "cpu":
        return 0
    dtype = getattr(torch, frozen_dtype)
    if model.startswith("tiny-stage"):
        from cascade.offline import tiny

        with torch.device("meta"):
            return arch.n_params(tiny.build_text_encoder(16000)) * DTYPE_BYTES[frozen_dtype]
    t5 = arch.build_t5(dtype=dtype)
    if placement != "8bit":
        return arch.n_bytes(t5)
    keep = set(t5._keep_in_fp32_modules or ())
    quantised = [m for name, m in t5.named_modules()
                 if isinstance(m, torch.nn.Linear) and not keep & set(name.split("."))]
    q_ids = {id(m.weight) for m in quantised}
    return sum(m.weight.numel() + 4 * m.out_features for m in quantised) + \
        sum(p.numel() * p.element_size() for p in t5.parameters() if id(p) not in q_ids)


def command_phases(plan, step: dict, frozen_dtype: str = "float16", sample_batch: int = 4,
                   validation_images: int = 4, t5_placement: str = "gpu") -> dict:
    """Device bytes of each phase of `cascade train`, in order: T5 encoding (T5 alone, freed after),
    class images (the frozen stage model sampling), training steps, validation grids (during
    training: weights + optimizer state + a sampling forward), export (weights and optimizer state
    still resident; safetensors copies one tensor at a time to the host, and the fp16 variant is
    converted from the written files on the host, so the device holds no second copy)."""
    plan = plan.device_plan()
    t5_bytes = t5_device_bytes(plan.model, frozen_dtype, t5_placement)
    t5_act = 64 * 2**20 if t5_bytes else 0  # encoder activations, 3 prompts of 77 tokens: a few MB, rounded up
    b = step["bytes"]
    weights_opt = b["params"] + b["optimizer"]
    val = weights_opt + trace_inference(plan.model, validation_images,
                                        plan.weights_dtype) - step["params_total"] * DTYPE_BYTES[plan.weights_dtype]
    return {"t5_encode": t5_bytes + t5_act,
            "class_images": trace_inference(plan.model, sample_batch, frozen_dtype) if plan.prior else 0,
            "train_step": b["peak"],
            "validation": val,
            "export": weights_opt}


def with_ema(phases: dict, step: dict, on_cpu: bool) -> tuple[dict, int]:
    """(phases, host bytes) with the EMA copy of train.ema counted: one fp32 tensor per trainable
    parameter (stages/ema.py), resident from the first training step to the export, on the device or
    (ema_on_cpu) in host memory."""
    ema = step["params_trainable"] * 4
    if on_cpu:
        return dict(phases), ema
    return {k: v + ema if k in ("train_step", "validation", "export") else v for k, v in phases.items()}, 0
