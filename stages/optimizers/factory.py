"""Optimizer construction for every memory option: torch AdamW (fused where the device has it),
8-bit AdamW (torchao's, else bitsandbytes'), LowPrecisionAdamW for bf16/fp16 weights, and the
optimizer step taken inside backward.

Optimizer-in-backward: each parameter gets a `register_post_accumulate_grad_hook` that steps that
parameter's own optimizer as soon as its gradient is complete and frees the gradient, so a full set
of gradients never exists (peak grads = the largest single tensor). Consequences, all checked:
- one process only: under DDP the hook fires on the local gradient *before* DDP's bucket
  all-reduce has averaged it, so ranks would step on different gradients and drift apart; we
  refuse it there (the gradient_as_bucket_view option is the multi-GPU saving instead);
- no gradient accumulation (each backward would step) and no global-norm clipping (the norm needs
  all gradients at once; per-step clipping is skipped with a warning);
- no fp16 mixed precision (the GradScaler's scaled gradients would step unscaled, inf steps would
  not be skipped): refused in the config check and here.
"""
from __future__ import annotations

import importlib.util
import logging

import torch

from stages.errors import InputError
from stages.optimizers.low_precision import LowPrecisionAdamW

log = logging.getLogger(__name__)


def _fused_ok(params) -> bool:
    p = params[0]
    return p.dtype in (torch.float32, torch.float16, torch.bfloat16) and p.device.type in ("cuda", "cpu", "mps")


def make(params, cfg, seed: int = 0, deepspeed: bool = False):
    """(optimizer, name) for the trainable `params` and a Train config section; `deepspeed`: the optimizer
    will step DeepSpeed's flat fp32 partitions (ZeRO), which picks the 8-bit AdamW (make_8bit)."""
    params = list(params)
    if getattr(cfg, "optimizer", "adamw") in ("adafactor", "prodigy"):  # stages/optimizers/beyond_adamw.py
        from stages.optimizers.beyond_adamw import make_extra

        return make_extra(params, cfg)
    low_precision = params[0].dtype != torch.float32
    if low_precision:
        states = "8bit" if cfg.use_8bit_adam else cfg.optimizer_states
        if states == "8bit" and importlib.util.find_spec("bitsandbytes") is None:
            raise InputError("use_8bit_adam needs bitsandbytes: pip install 'cascade-dreambooth[bnb]'")
        opt = LowPrecisionAdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                rounding=cfg.bf16_update, states=states, seed=seed)
        return opt, f"adamw-{states}-states/{cfg.bf16_update}-rounding"
    if cfg.use_8bit_adam:
        return make_8bit(params, cfg, deepspeed)
    if cfg.optimizer_states == "bf16":
        return LowPrecisionAdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, rounding="nearest",
                                 states="bf16", seed=seed), "adamw-bf16-states"
    fused = bool(cfg.fused_optimizer) and _fused_ok(params)
    return (torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, fused=fused or None),
            "adamw-fused" if fused else "adamw")


def make_8bit(params, cfg, deepspeed: bool = False):
    """8-bit AdamW on fp32 weights: torchao's AdamW8bit where torchao is installed (the comparison in
    docs/precision.md: the same update error, bytes and resume as bitsandbytes', and the only one that
    steps FSDP2's DTensors), else bitsandbytes'. Under DeepSpeed always bitsandbytes': ZeRO-1/2 take a
    view of each parameter's slice of the optimizer state (`narrow` at the parameter's offset in the flat
    partition), which torchao's 8-bit state refuses unless the offset falls on its 256-value block
    boundary (step 1 crashed with DoRA's small magnitude vectors: tests/test_optimizers_torchao.py), and
    it keeps fp32 moments for a partition that is not a multiple of 256 values (its `_new_buffer`), which
    ZeRO's padding does not promise. The name says which library steps."""
    if importlib.util.find_spec("torchao") is not None and not deepspeed:
        from stages.optimizers import torchao_lowbit

        return (torchao_lowbit.make(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, states="8bit",
                                    bf16_stochastic_round=False), "adamw8bit-torchao")
    from stages.setup import make_optimizer

    opt, name = make_optimizer(params, cfg.learning_rate, cfg.weight_decay, True)
    return opt, "adamw8bit-bitsandbytes" if name == "adamw-8bit" else name  # "adamw": no CPU backend (warned)


class InBackwardOptimizer(torch.optim.Optimizer):
    """Steps each parameter inside backward. Holds the learning rate in its own param_groups so LR
    schedulers drive it; `step()`/`zero_grad()` are no-ops (the work happened in backward)."""

    def __init__(self, params, factory):
        """`factory(params, index)` builds the optimizer of the index-th parameter (its own rounding
        stream: the same seed everywhere would round element j of every tensor the same way)."""
        params = list(params)
        inner0 = factory(params[:1], 0)
        super().__init__(params, {k: v for k, v in inner0.param_groups[0].items() if k != "params"})
        self.inner = {params[0]: inner0}
        for i, p in enumerate(params[1:], 1):
            self.inner[p] = factory([p], i)
        self.handles = [p.register_post_accumulate_grad_hook(self._hook) for p in params]
        self.steps_in_backward = 0

    def _hook(self, p: torch.Tensor):
        opt = self.inner[p]
        for g in opt.param_groups:
            g["lr"] = self.param_groups[0]["lr"]
        opt.step()
        p.grad = None
        self.steps_in_backward += 1

    def step(self, closure=None):
        return closure() if closure is not None else None

    def zero_grad(self, set_to_none: bool = True):
        return None

    def state_dict(self):
        return {"inner": [opt.state_dict() for opt in self.inner.values()], "lr": self.param_groups[0]["lr"]}

    def load_state_dict(self, state_dict):
        for opt, sd in zip(self.inner.values(), state_dict["inner"]):
            opt.load_state_dict(sd)
        self.param_groups[0]["lr"] = state_dict["lr"]

    def remove_hooks(self):
        for h in self.handles:
            h.remove()


def parameter_seed(seed: int, index: int) -> int:
    """The rounding seed of the index-th parameter's own optimizer (distinct per parameter)."""
    return (seed * 1_000_003 + (index + 1) * 7_919) % (2**63)


def build(params, cfg, num_processes: int = 1, seed: int = 0, mixed_precision: str = "no", deepspeed: bool = False):
    """The optimizer the trainer uses: `make`, optionally moved inside backward. `mixed_precision` is
    the resolved setting (mixed_precision=auto becomes fp16 on a GPU without bf16); `deepspeed`: the
    accelerator runs DeepSpeed (in-backward is refused there by the config check)."""
    params = list(params)
    if not cfg.optimizer_in_backward:
        return make(params, cfg, seed, deepspeed)
    if mixed_precision == "fp16":
        raise InputError("train.optimizer_in_backward cannot run under fp16 mixed precision (the gradients would "
                         "step unscaled and inf steps would not be skipped); use bf16 or optimizer_in_backward=false")
    if num_processes > 1:
        raise InputError("train.optimizer_in_backward works in a single process only: under DDP the per-parameter "
                         "hook would step before the gradient all-reduce; use ddp_bucket_view instead")
    if cfg.gradient_accumulation_steps > 1:
        raise InputError("train.optimizer_in_backward cannot accumulate gradients; set gradient_accumulation_steps=1")
    if cfg.max_grad_norm > 0:
        log.warning("optimizer_in_backward: gradient-norm clipping needs all gradients at once; max_grad_norm ignored")
    name = make(params[:1], cfg, seed)[1]
    opt = InBackwardOptimizer(params, lambda ps, i: make(ps, cfg, parameter_seed(seed, i))[0])
    return opt, name + "+in-backward"


def state_tensors(optimizer) -> list[torch.Tensor]:
    """Every tensor an optimizer holds as state, each once: per-parameter optimizers inside backward
    included, and 8-bit moments held in objects (q, absmax, code map). The planner and the bench count
    these; torch's MemTracker alone sees only plain tensors in `optimizer.state` of the outer optimizer."""
    opts = list(optimizer.inner.values()) if isinstance(optimizer, InBackwardOptimizer) else [optimizer]
    found: dict[int, torch.Tensor] = {}

    def walk(v, depth=0):
        if isinstance(v, torch.Tensor):
            found.setdefault(id(v), v)
        elif isinstance(v, dict):
            for x in v.values():
                walk(x, depth)
        elif isinstance(v, (list, tuple)):
            for x in v:
                walk(x, depth)
        elif hasattr(v, "__dict__") and depth < 3:  # _State8bit, bitsandbytes' QuantState
            for x in vars(v).values():
                walk(x, depth + 1)

    for o in opts:
        for st in o.state.values():
            walk(st)
    return list(found.values())


def ddp_kwargs(cfg) -> list:
    """accelerate kwargs handlers: DDP with gradient_as_bucket_view (gradients are views into the
    all-reduce buckets, so DDP holds no second full copy of them)."""
    from accelerate.utils import DistributedDataParallelKwargs

    return [DistributedDataParallelKwargs(gradient_as_bucket_view=bool(cfg.ddp_bucket_view))]
