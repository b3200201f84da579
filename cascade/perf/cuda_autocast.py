"""CUDA's autocast rules on CPU tensors, for the memory planner.

The planner traces on fake CPU tensors, where `torch.autocast("cpu")` applies the CPU op lists: there
group_norm, layer_norm, softmax and nearest upsampling run in bf16, while CUDA autocast runs them in
fp32 (and keeps their outputs, and the inputs that the next elementwise ops save for backward, in
fp32). A trace for a CUDA target must count those fp32 tensors. Fake CUDA tensors cannot be made
on a CPU-only build of torch, so `cuda_rules()` emulates the difference: CPU autocast still casts
the matmuls and convolutions to the low precision (both devices list conv/linear/bmm/baddbmm/sdpa),
and a torch-function mode runs the ops of CUDA's fp32 lists with their floating inputs cast to fp32
and autocast off, as CUDA's autocast kernel does (the cast precedes autograd, so backward saves the
fp32 copies). The lists are those of torch's `aten/src/ATen/autocast_mode.h` (AT_FORALL_FP32 and
AT_FORALL_FP32_SET_OPT_DTYPE), by the Python name of the op; `scripts/device_check.py` compares the
emulation with real CUDA autocast on a GPU (the saved-for-backward dtypes of a small UNet)."""
from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
from torch.overrides import TorchFunctionMode

# AT_FORALL_FP32: every floating input cast to fp32
FP32 = frozenset({
    "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal", "rsqrt",
    "sinh", "tan", "pow", "__pow__", "__rpow__", "softplus", "layer_norm", "native_layer_norm", "rms_norm",
    "group_norm", "frobenius_norm", "nuclear_norm", "cosine_similarity", "poisson_nll_loss",
    "cosine_embedding_loss", "nll_loss", "nll_loss2d", "hinge_embedding_loss", "kl_div", "l1_loss",
    "smooth_l1_loss", "huber_loss", "mse_loss", "margin_ranking_loss", "multilabel_margin_loss",
    "soft_margin_loss", "triplet_margin_loss", "multi_margin_loss", "binary_cross_entropy_with_logits", "dist",
    "pdist", "cdist", "renorm", "logsumexp", "upsample_nearest1d", "upsample_nearest2d", "upsample_nearest3d",
    "upsample_linear1d", "upsample_bilinear2d", "upsample_trilinear3d", "upsample_bicubic2d"})
# AT_FORALL_FP32_SET_OPT_DTYPE: run with dtype=float32 when the first input is eligible and none is given
FP32_SET_OPT_DTYPE = frozenset({"prod", "softmax", "log_softmax", "cumprod", "cumsum", "linalg_vector_norm",
                                "linalg_matrix_norm", "sum"})
# F.interpolate dispatches to the upsample_* ops above for these modes ("area" is adaptive pooling)
INTERPOLATE_FP32_MODES = frozenset({"nearest", "nearest-exact", "linear", "bilinear", "bicubic", "trilinear"})


def _eligible(x) -> bool:
    return isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != torch.float64


def _to_fp32(x):
    if _eligible(x) and x.dtype != torch.float32:
        return x.float()
    if isinstance(x, (list, tuple)):
        return type(x)(_to_fp32(v) for v in x)
    return x


def policy(func, args, kwargs) -> str | None:
    """'fp32' | 'fp32_set_opt_dtype' | None (the CPU rules already match CUDA's for this call)."""
    name = getattr(func, "__name__", "")
    if name == "interpolate":
        mode = kwargs.get("mode", args[3] if len(args) > 3 else "nearest")
        return "fp32" if mode in INTERPOLATE_FP32_MODES else None
    if name in FP32:
        return "fp32"
    if name in FP32_SET_OPT_DTYPE:
        return "fp32_set_opt_dtype"
    return None


class CudaAutocastRules(TorchFunctionMode):
    """While CPU autocast is on, runs CUDA's fp32-listed ops in fp32 (outside autocast, as CUDA does)."""

    def __init__(self, device_type: str = "cpu"):
        super().__init__()
        self.device_type = device_type
        self.upcast: dict[str, int] = {}  # op name -> calls run in fp32 (for tests and reports)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not torch.is_autocast_enabled(self.device_type):
            return func(*args, **kwargs)
        rule = policy(func, args, kwargs)
        if rule is None:
            return func(*args, **kwargs)
        first = args[0] if args else None
        if rule == "fp32_set_opt_dtype":
            if not _eligible(first) or kwargs.get("dtype") is not None:
                return func(*args, **kwargs)
            kwargs = {**kwargs, "dtype": torch.float32}
        else:
            args, kwargs = _to_fp32(args), {k: _to_fp32(v) for k, v in kwargs.items()}
        name = getattr(func, "__name__", str(func))
        self.upcast[name] = self.upcast.get(name, 0) + 1
        with torch.autocast(self.device_type, enabled=False):
            return func(*args, **kwargs)


@contextmanager
def cuda_rules(enabled: bool = True):
    """Inside: CPU autocast regions follow CUDA's fp32 lists. Checkpointed recomputation re-enters
    autocast during backward, where the autograd engine does not carry torch-function modes: every
    `torch.utils.checkpoint.checkpoint` call (diffusers' and stages/activation_ckpt.py's) gets the
    rules in its recompute context too. Yields the mode (its `upcast` counts), or None."""
    if not enabled:
        yield None
        return
    import torch.utils.checkpoint as tuc

    from stages import activation_ckpt

    mode = CudaAutocastRules()
    real = tuc.checkpoint

    def checkpoint(fn, *args, **kwargs):
        if kwargs.get("use_reentrant", True) is False and "context_fn" not in kwargs:
            kwargs["context_fn"] = lambda: (nullcontext(), mode)
        return real(fn, *args, **kwargs)

    saved = activation_ckpt.checkpoint
    tuc.checkpoint, activation_ckpt.checkpoint = checkpoint, checkpoint
    try:
        with mode:
            yield mode
    finally:
        tuc.checkpoint, activation_ckpt.checkpoint = real, saved
