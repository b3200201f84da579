"""The memory planner behind `cascade bench --estimate-memory`.

Each real model is built from its shipped architecture config with no weights (meta device, then
fake tensors), and one real training step (forward, backward, optimizer step) runs under
`FakeTensorMode` inside torch's `MemTracker`, which records every tensor the step allocates and
frees: parameters, gradients, optimizer state, activations and temporaries, and the peak. Nothing
is computed and nothing is downloaded, so IF-I-XL plans on a laptop.

What it counts and what it does not: tensor bytes on the training device (the CUDA context, ~0.5-1
GB, and allocator fragmentation come on top; the fit verdict adds a margin for them). The optimizer
state is created before tracing (one step on zero gradients), so the trace is a steady-state step;
every state tensor is handed to the tracker (`factory.state_tensors`), including those of the
per-parameter optimizers that optimizer-in-backward keeps in hooks.
8-bit AdamW (bitsandbytes kernels do not run on fake tensors) is stood in for by an optimizer that
allocates exactly bitsandbytes' state layout; tests/test_memory.py checks it against the real one.
The loss in the trace is the epsilon MSE (the hybrid bound adds a few per-pixel tensors: < 1 MB/img).
"""
from __future__ import annotations

import functools
import warnings
from dataclasses import asdict, dataclass, replace

import torch

from cascade.perf import arch, engine_buffers
from cascade.perf.cuda_autocast import cuda_rules
from cascade.perf.step import synthetic_batch, train_step
from stages import activation_ckpt, setup
from stages.optimizers import factory, low_precision

GB = 1e9


@dataclass(frozen=True)
class Plan:
    """One combination of options to estimate (the training-step part of a `cascade train`)."""
    model: str  # an arch name (if-i-xl ...) or "tiny-stage1"/"tiny-stage2"
    batch: int = 4  # instance images per step
    prior: bool = True  # + as many class images (stage I prior preservation)
    weights_dtype: str = "float32"
    checkpointing: str = "none"  # none | resnets | full
    use_8bit_adam: bool = False
    optimizer_states: str = "fp32"
    in_backward: bool = False
    lora_rank: int = 0
    autocast: str | None = "bfloat16"  # mixed precision of the activations (None: CPU fp32 run)
    text_len: int = 77
    resolution: int | None = None  # training input size (default: the model's sample_size)
    offload: bool = False  # DeepSpeed ZeRO-Offload: bf16 module on the device, fp32 master + Adam on the host
    autocast_rules: str = "cuda"  # whose autocast op lists the trace follows: cuda (the target) | cpu

    def device_plan(self) -> "Plan":
        """What the device holds under offload: the bf16 module, gradients reduced tensor by tensor
        into buckets and copied to the host (modelled as optimizer-in-backward with a stateless step)."""
        return replace(self, weights_dtype="bfloat16", use_8bit_adam=False, in_backward=True) if self.offload else self

    def label(self) -> str:
        if self.offload:
            return ", ".join(([f"LoRA r{self.lora_rank}"] if self.lora_rank else []) +
                             ["fp32 master on host (ZeRO-Offload), bf16 module", f"ckpt {self.checkpointing}"])
        opt = "8-bit Adam" if self.use_8bit_adam else f"Adam ({self.optimizer_states})"
        parts = [self.weights_dtype.replace("bfloat", "bf").replace("float", "fp"),
                 f"ckpt {self.checkpointing}", opt + (" in backward" if self.in_backward else "")]
        if self.lora_rank:
            parts.insert(0, f"LoRA r{self.lora_rank}")
        return ", ".join(parts)


class Bnb8bitStandIn(torch.optim.Optimizer):
    """Allocates what bitsandbytes' AdamW8bit allocates (blockwise: uint8 state1/state2 + fp32
    absmax per 256 values for tensors of >= 4096 elements, fp32 states below) and does no math."""
    min_8bit_size, block = 4096, 256

    def __init__(self, params, lr=1e-4):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None or p in self.state:
                    continue
                if p.numel() >= self.min_8bit_size:
                    nblocks = (p.numel() + self.block - 1) // self.block
                    self.state[p] = {"state1": torch.zeros_like(p, dtype=torch.uint8),
                                     "state2": torch.zeros_like(p, dtype=torch.uint8),
                                     "absmax1": p.new_zeros(nblocks, dtype=torch.float32),
                                     "absmax2": p.new_zeros(nblocks, dtype=torch.float32)}
                else:
                    self.state[p] = {"state1": torch.zeros_like(p, dtype=torch.float32),
                                     "state2": torch.zeros_like(p, dtype=torch.float32)}


class _Fake8bitState:
    """LowPrecisionAdamW's 8-bit moment, with the same tensors, for fake tracing."""

    def __init__(self, like, signed):
        self.q = torch.zeros(like.numel(), dtype=torch.uint8, device=like.device)
        self.absmax = torch.zeros((like.numel() + 255) // 256, dtype=torch.float32, device=like.device)

    def get(self, start=0, end=None):
        end = self.q.numel() if end is None else end
        return torch.zeros(end - start, dtype=torch.float32, device=self.q.device)

    def set(self, value, start=0):
        torch.zeros(value.numel(), dtype=torch.uint8, device=self.q.device)  # the quantised copy, then freed


class _StateView(torch.optim.Optimizer):
    """Hands MemTracker every optimizer state tensor under the optimizer-state category: it reads only
    `.state` of the optimizers it is given, and would miss per-parameter optimizers in backward hooks
    and 8-bit moments held in objects."""

    def __init__(self, tensors):  # no super().__init__: only `.state` is read
        self.state = {i: {"t": t} for i, t in enumerate(tensors)}


class _NoHook:
    def remove(self):
        pass


def _tracker(unet):
    """A MemTracker for `unet`. torch's tracker puts a gradient hook on every parameter and fails on
    frozen ones (LoRA's base weights): those are marked as already hooked (they never get gradients)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    # it warns once per untracked non-tensor it meets (None gradients, step counters): noise here
    warnings.filterwarnings("ignore", message="Expected a tensor or a traceable wrapper-subclass",
                            category=UserWarning)
    tracker = MemTracker()
    for p in unet.parameters():
        if not p.requires_grad:
            tracker._param_to_grad_hook_handles[p] = (_NoHook(), _NoHook())
    return tracker


def unet_config(model: str) -> dict:
    if model.startswith("tiny-stage"):
        from cascade.offline import tiny

        build = tiny.build_stage1_unet if model.endswith("1") else tiny.build_stage2_unet
        with torch.device("meta"):
            return dict(build().config)
    return arch.unet_config(model)


def _train_cfg(plan: Plan):
    from cascade.config import Train

    return Train(weights_dtype=plan.weights_dtype, use_8bit_adam=plan.use_8bit_adam, fused_optimizer=False,
                 optimizer_states=plan.optimizer_states, optimizer_in_backward=plan.in_backward, max_grad_norm=0.0,
                 lora_rank=plan.lora_rank)


class _HostStep(torch.optim.Optimizer):
    """The device side of an offloaded step: no state here (the host updates the fp32 master)."""

    def __init__(self, params):
        super().__init__(params, {"lr": 0.0})

    def step(self, closure=None):
        return None


def _make_optimizer(params, plan: Plan):
    if plan.offload:
        return factory.InBackwardOptimizer(params, lambda ps, i: _HostStep(ps))
    cfg = _train_cfg(plan)
    if plan.use_8bit_adam and params[0].dtype == torch.float32:
        standin = lambda ps, *_: Bnb8bitStandIn(ps)  # noqa: E731
        if plan.in_backward:
            return factory.InBackwardOptimizer(params, standin)
        return standin(params)
    return factory.build(params, cfg)[0]


def _prime(optimizer, params):
    """Create the optimizer state (a step on zero gradients) so the traced step is a steady-state one."""
    opts = list(optimizer.inner.values()) if isinstance(optimizer, factory.InBackwardOptimizer) else [optimizer]
    for p in params:
        p.grad = torch.zeros_like(p)
    for o in opts:
        o.step()
    for p in params:
        p.grad = None


def _build(plan: Plan, cfg: dict):
    """The UNet (and LoRA adapters) built on the meta device, then given fake CPU tensors: call under
    FakeTensorMode. Built in the weights' dtype (Module.to() cannot swap fake parameters, and peft's
    adapter placement fails on fake ones, hence meta first)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"), arch.default_dtype(getattr(torch, plan.weights_dtype)):
        unet = UNet2DConditionModel(**cfg)
        if plan.lora_rank:
            setup.add_lora(unet, plan.lora_rank, 0)
    for module in unet.modules():
        for name, p in module._parameters.items():
            if p is not None:
                module._parameters[name] = torch.nn.Parameter(torch.empty_like(p, device="cpu"),
                                                              requires_grad=p.requires_grad)
        for name, b in module._buffers.items():
            if b is not None:
                module._buffers[name] = torch.empty_like(b, device="cpu")
    return unet


def trace_step(plan: Plan) -> dict:
    """Bytes of one steady-state training step: params, grads, optimizer state, activations, peak."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    asked, plan = plan, plan.device_plan()
    cfg = unet_config(plan.model)
    saved = low_precision._State8bit
    low_precision._State8bit = _Fake8bitState
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            unet = _build(plan, cfg)
            activation_ckpt.apply(unet, plan.checkpointing)
            unet.train()
            params = [p for p in unet.parameters() if p.requires_grad]
            opt = _make_optimizer(params, plan)
            _prime(opt, params)
            n = plan.batch * (2 if plan.prior else 1)
            dtype = next(unet.parameters()).dtype
            batch = synthetic_batch(cfg, n, plan.text_len, dtype, resolution=plan.resolution)
            tracker = _tracker(unet)
            tracker.track_external(unet, opt, _StateView(factory.state_tensors(opt)))
            ac = torch.autocast("cpu", dtype=getattr(torch, plan.autocast), enabled=plan.autocast is not None) \
                if plan.autocast else torch.autocast("cpu", enabled=False)
            with tracker, cuda_rules(plan.autocast is not None and plan.autocast_rules == "cuda"):
                train_step(unet, opt, batch, ac)
            peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
            now = tracker.get_tracker_snapshot("current")[torch.device("cpu")]
            kinds = {str(k.value) if hasattr(k, "value") else str(k): v for k, v in peak.items()}
            cur = {str(k.value) if hasattr(k, "value") else str(k): v for k, v in now.items()}
            grads_max = max(p.numel() * p.element_size() for p in params)
    finally:
        low_precision._State8bit = saved
    n_all = sum(p.numel() for p in unet.parameters())
    n_train = sum(p.numel() for p in params)
    # DeepSpeed ZeRO-Offload's device buffers at the sizes cascade sets (stages/engines.py)
    bucket = engine_buffers.zero_offload_bytes(params) if asked.offload else 0
    kinds["Total"] += bucket
    return {"plan": asdict(asked), "label": asked.label(), "params_total": n_all, "params_trainable": n_train,
            "largest_trainable": max(p.numel() for p in params),
            "host_bytes": 16 * n_train if asked.offload else 0,  # fp32 master, 2 moments, fp32 gradient copy
            "bytes": {"params": cur["Parameter"] + cur["Buffer"],
                      "grads": bucket + (grads_max if plan.in_backward else
                                sum(p.numel() * p.element_size() for p in params)),
                      "optimizer": cur.get("Optstate", 0),
                      "activations_at_peak": sum(kinds.get(k, 0) for k in ("Activation", "Temp", "Other")),
                      "peak": kinds["Total"]}}


@functools.lru_cache(maxsize=None)  # the command's phases and the validation advice ask for the same traces
def trace_inference(model: str, batch: int, dtype: str = "float16", text_len: int = 77) -> int:
    """Peak bytes of one sampling forward (classifier-free guidance doubles the batch) of a frozen UNet."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    cfg = unet_config(model)
    with FakeTensorMode(allow_non_fake_inputs=True):
        unet = _build(Plan(model, weights_dtype=dtype), cfg)
        unet.eval()
        x, t, enc, labels = synthetic_batch(cfg, 2 * batch, text_len, next(unet.parameters()).dtype)
        tracker = _tracker(unet)
        tracker.track_external(unet)
        with tracker, torch.no_grad():
            unet(x, t, encoder_hidden_states=enc, class_labels=labels, return_dict=False)
        return tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]


def ddp_plan(plan: Plan) -> Plan:
    """The plan of one DDP process: optimizer-in-backward is refused there, so a full set of
    gradients exists (gradient_as_bucket_view: they are the all-reduce buckets, no second copy)."""
    return replace(plan, in_backward=False)


def fits(peak: int, gpu_bytes: float, context: float = 1.0 * 2**30, slack: float = 0.05) -> tuple[bool, float]:
    """(fits, headroom bytes) with a margin for the CUDA context and allocator fragmentation."""
    need = peak * (1 + slack) + context
    return need <= gpu_bytes, gpu_bytes - need


# switches tried in order when a plan does not fit: the advice names the first combination that does
LADDER = (("weights_dtype", "bfloat16", "train.weights_dtype=bfloat16"),
          ("checkpointing", "full", "train.gradient_checkpointing=true (scope full)"),
          ("use_8bit_adam", True, "train.use_8bit_adam=true"),
          ("in_backward", True, "train.optimizer_in_backward=true"),
          ("batch", None, "a smaller train.batch_size"))


def advise(plan: Plan, gpu_bytes: float, trace=trace_step, ddp: bool = False) -> tuple[Plan | None, list[str], dict | None]:
    """Switch options on one at a time (LADDER) until the training step fits; (plan, switches, trace).
    Under DDP optimizer-in-backward is not offered (it is refused there)."""
    current, switched = plan, []
    for field, value, text in LADDER:
        if ddp and field == "in_backward":
            continue
        if field == "batch":
            while current.batch > 1:
                current = replace(current, batch=current.batch // 2)
                result = trace(current)
                if fits(result["bytes"]["peak"], gpu_bytes)[0]:
                    return current, switched + [f"train.batch_size={current.batch}"], result
            return None, switched, None
        if getattr(current, field) == value:
            continue
        current = replace(current, **{field: value})
        switched.append(text)
        result = trace(current)
        if fits(result["bytes"]["peak"], gpu_bytes)[0]:
            return current, switched, result
    return None, switched, None


def parse_size(text: str) -> float:
    """'40GB', '24GiB', '16G', '12000MB' -> bytes."""
    import re

    from stages.errors import InputError

    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([KMGT]?)(i?)B?\s*", text, re.IGNORECASE)
    if not m or float(m.group(1)) <= 0:
        raise InputError(f"--gpu-memory {text!r}: expected a size above 0 like 40GB or 24GiB")
    value, unit, binary = float(m.group(1)), m.group(2).upper(), m.group(3)
    power = " KMGT".index(unit) if unit else 0
    return value * (1024 if binary else 1000) ** power
