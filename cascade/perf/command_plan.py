"""Device bytes of each phase of `cascade train` (T5 encoding, class images, training, validation,
export) around the planner's traced training step, and the host copies beside them."""
from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class ValidationPlan:
    """What `cascade validation` samples while a stage trains (cascade/validation.py), in images
    before classifier-free guidance doubles them.
    Stage I: "a [V] <class>" and "a <class>", `images` seeds each, in one batch (2 x images), then the
    frozen stage II (`partner`) upsamples all of them in one batch. Stage II: the held-out photos
    (`photos`, at least the first training photo) and, chained, stage I's `images` class samples,
    made once by the frozen stage I in batches of `partner_batch` (stage1.sample.batch_size)."""
    stage: int
    images: int
    partner: str | None = None  # arch name of the frozen other stage (None: chain off)
    partner_dtype: str = "float16"
    photos: int = 1
    partner_batch: int = 4

    def own_batch(self) -> int:
        if self.stage == 1:
            return 2 * self.images
        return self.photos + (self.images if self.partner else 0)

    def partner_images(self) -> int:
        if self.partner is None:
            return 0
        return 2 * self.images if self.stage == 1 else min(self.images, self.partner_batch)


def validation_phases(plan, step: dict, val: ValidationPlan, inference=trace_inference) -> dict:
    """Device bytes of validation's two sub-phases: the trained model sampling its grid
    (`validation_own`: weights + optimizer state + its sampling forward), and the frozen partner
    sampling while all of the training state stays resident (`validation_partner`)."""
    plan = plan.device_plan()
    b = step["bytes"]
    weights_opt = b["params"] + b["optimizer"]
    own = weights_opt + inference(plan.model, val.own_batch(), plan.weights_dtype) - \
        step["params_total"] * DTYPE_BYTES[plan.weights_dtype]
    out = {"validation_own": own}
    if val.partner is not None and val.images > 0:
        out["validation_partner"] = weights_opt + inference(val.partner, val.partner_images(), val.partner_dtype)
    return out


def command_phases(plan, step: dict, frozen_dtype: str = "float16", sample_batch: int = 4,
                   validation: ValidationPlan | None = None, t5_placement: str = "gpu",
                   inference=trace_inference) -> dict:
    """Device bytes of each phase of `cascade train`, in order: T5 encoding (T5 alone, freed after),
    class images (the frozen stage model sampling), training steps, validation grids (during
    training, see validation_phases), export (weights and optimizer state still resident;
    safetensors copies one tensor at a time to the host, and the fp16 variant is converted from the
    written files on the host, so the device holds no second copy)."""
    plan = plan.device_plan()
    t5_bytes = t5_device_bytes(plan.model, frozen_dtype, t5_placement)
    t5_act = 64 * 2**20 if t5_bytes else 0  # encoder activations, 3 prompts of 77 tokens: a few MB, rounded up
    b = step["bytes"]
    phases = {"t5_encode": t5_bytes + t5_act,
              "class_images": inference(plan.model, sample_batch, frozen_dtype) if plan.prior else 0,
              "train_step": b["peak"]}
    if validation is not None and validation.images > 0:
        phases.update(validation_phases(plan, step, validation, inference))
    phases["export"] = b["params"] + b["optimizer"]
    return phases


EMA_PHASES = ("train_step", "validation_own", "validation_partner", "export")


def with_ema(phases: dict, step: dict, on_cpu: bool) -> tuple[dict, dict]:
    """(phases, host) with the EMA copy of train.ema counted (stages/ema.py): one fp32 shadow tensor
    per trainable parameter, resident from the first training step to the export, on the device, or
    with ema_on_cpu in host memory. On the host each step also makes fp32 host copies of every
    trainable parameter before averaging (`TrainingEMA._sources`), so the host peak is twice the
    shadow and each step moves 4 bytes a trainable parameter from the device; the device converts
    one parameter at a time to fp32 for that copy (the largest parameter, in fp32, on top)."""
    n = step["params_trainable"]
    shadow = 4 * n
    if on_cpu:
        transient = 4 * step.get("largest_trainable", 0)
        return ({k: v + transient if k == "train_step" else v for k, v in phases.items()},
                {"ema_host_peak": 2 * shadow, "ema_host_shadow": shadow, "ema_traffic_per_step": 4 * n})
    return {k: v + shadow if k in EMA_PHASES else v for k, v in phases.items()}, {}
