"""torchao's low-bit AdamW (8-bit / 4-bit / fp8 moments, optional bf16 stochastic rounding of the
weights) with a state dict of plain tensors.

Why torchao for these paths (docs/precision.md, "the library comparison"): its quantised moments
are tensor subclasses that FSDP2's DTensor wraps (our `_State8bit` builds plain tensors and fails
there), its bf16 stochastic rounding is the same unbiased scheme as ours, and its update matches
ours within the 8-bit quantisation error on the same gradients.

What we add: torchao's moments pickle as `OptimState8bit` objects, which a weights-only load accepts
only because torchao adds the class to torch's allow-list. Our checkpoints hold plain tensors only
(nothing is unpickled from a file a user was handed), so `state_dict` writes each quantised moment
as its inner tensors plus a kind name and `load_state_dict` rebuilds it from a fixed table.

Two things to know when wiring it in: the learning rate is a tensor (set it with
`group["lr"].fill_(x)`, which torch's LR schedulers do; assigning a float raises at the next step),
and the stochastic rounding draws from torch's global RNG (accelerate's checkpoint saves it, so a
resumed run rounds as the uninterrupted one would)."""
from __future__ import annotations

import importlib.util
import os

import torch

from stages.errors import InputError

KINDS = ("8bit", "4bit", "fp8")
_TAG = "__torchao__"


def check_available():
    if importlib.util.find_spec("torchao") is None:
        raise InputError("torchao's optimizers need the torchao package: pip install 'torchao>=0.18,<0.19'")


def _classes() -> dict:
    """kind -> (optimizer class, state subclass): the only classes a loaded state is rebuilt into."""
    from torchao.optim import AdamW4bit, AdamW8bit, AdamWFp8
    from torchao.optim.subclass_4bit import OptimState4bit
    from torchao.optim.subclass_8bit import OptimState8bit
    from torchao.optim.subclass_fp8 import OptimStateFp8

    return {"8bit": (AdamW8bit, OptimState8bit), "4bit": (AdamW4bit, OptimState4bit), "fp8": (AdamWFp8, OptimStateFp8)}


def _kind(v) -> str | None:
    return next((kind for kind, (_, sub) in _classes().items() if type(v) is sub), None)


def _is_dtensor(v) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(v, DTensor)


def _to_plain(v):
    """A quantised moment as {tag: kind, inner tensors..., ctx: its flatten context in plain types}. Under
    FSDP2 every moment is a DTensor, whose shard torchao quantises or not by the shard's own size (so ranks
    may differ): torch.distributed.checkpoint lays out (and reshards) DTensors, not torchao's inner tensors,
    so each is written the same way on every rank, as its fp32 values in the parameter's layout ({tag:
    "sharded", "values": DTensor}; 4 B a value on disk, not 1), and `load_state_dict` quantises it again."""
    if _is_dtensor(v):
        from torch.distributed.tensor import DTensor

        local = v.to_local()
        values = local.dequantize() if _kind(local) else local.float()
        return {_TAG: "sharded", "values": DTensor.from_local(values, v.device_mesh, v.placements, run_check=False,
                                                              shape=v.shape, stride=v.stride())}
    if (kind := _kind(v)) is None:
        return v
    names, ctx = v.__tensor_flatten__()
    plain_ctx = [str(c).removeprefix("torch.") if isinstance(c, torch.dtype) else
                 (list(c) if isinstance(c, torch.Size) else c) for c in ctx]
    return {_TAG: kind, **{n: getattr(v, n) for n in names}, "ctx": plain_ctx}


def _from_plain(d):
    if not (isinstance(d, dict) and _TAG in d):
        return d
    sub = _classes()[d[_TAG]][1]
    ctx = [getattr(torch, c) if isinstance(c, str) and isinstance(getattr(torch, c, None), torch.dtype) else
           (torch.Size(c) if isinstance(c, list) else c) for c in d["ctx"]]
    return sub.__tensor_unflatten__({n: d[n] for n in sub.tensor_attrs}, ctx, None, None)


class _PlainStates:
    """Mixin: the optimizer's state dict holds tensors, numbers and strings only."""

    def state_dict(self):
        sd = super().state_dict()
        sd["state"] = {i: {k: _to_plain(v) for k, v in st.items()} for i, st in sd["state"].items()}
        return sd

    def load_state_dict(self, state_dict):
        saved = (i for g in state_dict["param_groups"] for i in g["params"])  # ids, or names under FSDP2
        live = dict(zip(saved, (p for g in self.param_groups for p in g["params"])))
        state, requantise = {}, []
        for i, st in state_dict["state"].items():
            state[i] = {}
            for k, v in st.items():
                if isinstance(v, dict) and v.get(_TAG) == "sharded":  # FSDP2: fp32 values, quantised below
                    requantise.append((live[i], k, v["values"]))
                    v = v["values"]
                state[i][k] = _from_plain(v)
        super().load_state_dict({**state_dict, "state": state})
        for p, k, values in requantise:  # torchao's own buffer for this shard, as its first step made it
            buf = self._new_buffer(p, signed=k == "exp_avg")
            _requantise(buf.to_local(), values.to_local())
            self.state[p][k] = buf


def _requantise(state, values: torch.Tensor):
    """Quantise dequantised `values` into torchao's `state` so that it dequantises to the same values (a
    step reads a moment only through its dequantised values). Quantising them afresh is not enough: the
    signed map ends at -0.993, not -1, so a block whose largest value was negative would get a 0.993x scale
    and some codes one step up. The block's scale is found again instead (its largest value / 0.993 when
    that value is negative, within 2 float steps), and the codes are taken with it."""
    from torchao.optim.quant_utils import quantize_8bit_with_qmap

    state.copy_(values)  # torchao's quantisation (or a plain copy): kept for a block no scale reproduces
    if _kind(state) != "8bit":  # plain, or 4-bit (packed codes) / fp8 (no map): as close as one requantisation
        return
    n, qmap = state.scale.numel(), state.qmap
    want = values.reshape(n, -1)
    top = want.abs().amax(-1)
    negative_top = (want == -top[:, None]).any(-1)
    guess = torch.where(negative_top, top / qmap.min().abs(), top)
    codes, scale = state.codes.view(n, -1).clone(), state.scale.clone()
    found = torch.zeros(n, dtype=torch.bool, device=scale.device)
    for steps in (0, 1, -1, 2, -2):
        cand = guess
        for _ in range(abs(steps)):
            cand = torch.nextafter(cand, torch.full_like(cand, float("inf") if steps > 0 else float("-inf")))
        cand_codes = quantize_8bit_with_qmap((want / cand[:, None]).nan_to_num(), qmap).view(n, -1)
        fits = (qmap[cand_codes.int()] * cand[:, None] == want).all(-1) & ~found & (top > 0)
        codes, scale = torch.where(fits[:, None], cand_codes, codes), torch.where(fits, cand, scale)
        found |= fits
    state.codes.copy_(codes.view_as(state.codes))
    state.scale.copy_(scale)


_WRAPPED: dict = {}


def _wrapped(kind: str):
    if kind not in _WRAPPED:
        base = _classes()[kind][0]
        _WRAPPED[kind] = type(f"Plain{base.__name__}", (_PlainStates, base), {})
    return _WRAPPED[kind]


def _own_compile_cache_per_rank():
    """torchao compiles its step per parameter; under FSDP2 the compiled code is cached on disk under a key
    that holds the parameter's global shape, not its shard's. Where the shards differ (a (1, 32) tensor on
    2 ranks: 1 row and none), a rank that finds another rank's code steps its shard wrongly: rank 0 left
    that tensor unchanged on every run after the first (tests/test_torchao_train.py). So each rank of each
    process count keeps its own inductor cache, below the one the user set (or torch's default)."""
    world = os.environ.get("WORLD_SIZE", "1")
    if world == "1":
        return
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    base = cache_dir()
    marker = f"rank{os.environ.get('RANK', '0')}-of-{world}"
    if os.path.basename(base) != marker:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(base, marker)


def make(params, lr: float, weight_decay: float = 0.0, states: str = "8bit", bf16_stochastic_round: bool = True,
         betas=(0.9, 0.999), eps: float = 1e-8):
    """torchao AdamW with `states` moments (tensors under 4096 values, or not a multiple of the block
    size, keep moments in the parameter's dtype, as bitsandbytes does). bf16 weights are written with
    stochastic rounding when `bf16_stochastic_round`; fp32 weights are written exactly."""
    check_available()
    _own_compile_cache_per_rank()
    if states not in KINDS:
        raise ValueError(f"states must be one of {KINDS}, not {states!r}")
    return _wrapped(states)(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                            bf16_stochastic_round=bf16_stochastic_round)


def make_offload(params, optimizer_class=torch.optim.AdamW, **kwargs):
    """torchao's CPUOffloadOptimizer: `optimizer_class` itself steps each parameter's host copy (the
    chosen optimizer is kept; DeepSpeed's offload replaces any client optimizer by its CPU Adam).
    Single GPU only, and it needs CUDA (or XPU) for its copy streams; on a machine without one it is
    refused in one line here (torchao asserts). Not run on a GPU by us yet (docs/precision.md)."""
    check_available()
    if not torch.cuda.is_available():
        raise InputError("train.offload_optimizer through torchao's CPUOffloadOptimizer needs a CUDA GPU "
                         "(it moves each gradient to the host and the updated weight back)")
    from torchao.optim import CPUOffloadOptimizer

    return CPUOffloadOptimizer(params, optimizer_class, **kwargs)
