"""Low-precision trainable weights: AdamW whose update is computed in fp32 and written back to bf16/fp16
weights without the bias of round-to-nearest.

A bf16 weight keeps 8 mantissa bits, so an update smaller than ~1/256 of the weight rounds away
entirely with round-to-nearest and fine-tuning at lr 1e-5 silently stops. Two remedies, each a
config switch (`train.bf16_update`):
- "stochastic": round up or down with probability proportional to the distance (unbiased in
  expectation; no extra memory);
- "kahan": keep the rounding error of each weight in an fp32 compensation tensor and add it back on
  the next update (one extra 4-byte tensor per parameter, deterministic).
Moment states are kept in fp32, bf16, or 8-bit blockwise-quantised form (bitsandbytes' dynamic
quantisation maps, ~2 bytes/parameter for both moments)."""
from __future__ import annotations

import math

import torch

ROUNDINGS = ("stochastic", "kahan", "nearest")
STATE_KINDS = ("fp32", "bf16", "8bit")
_BLOCK = 256


def stochastic_round(x: torch.Tensor, dtype: torch.dtype, generator: torch.Generator | None = None) -> torch.Tensor:
    """fp32 -> bf16/fp16 rounding down or up to the neighbouring representable values, up with
    probability equal to the fractional distance (unbiased in expectation). bf16 shares fp32's
    exponent layout (add random low 16 bits, truncate); fp16 picks between its two neighbours."""
    x = x.float()
    if dtype == torch.bfloat16:
        where = generator.device if generator is not None else x.device  # drawn where the generator lives
        noise = torch.randint(0, 1 << 16, x.shape, generator=generator, dtype=torch.int32, device=where).to(x.device)
        bits = (x.view(torch.int32) + noise) & -65536  # add random low 16 bits, truncate
        return bits.view(torch.float32).to(torch.bfloat16)
    if dtype == torch.float16:
        # lo: the largest fp16 value <= x (round-to-nearest may land above x), hi: the next one up; round
        # up with probability (x - lo) / (hi - lo). Starting from the nearest value instead rounds every
        # x just below a representable value up to it: +0.05 ulp of bias per +-0.1-ulp update.
        near = x.to(torch.float16)
        lo = torch.where(near.float() > x, torch.nextafter(near, torch.full_like(near, -math.inf)), near)
        hi = torch.nextafter(lo, torch.full_like(lo, math.inf))
        u = torch.rand(x.shape, generator=generator, device=generator.device if generator is not None
                       else x.device).to(x.device)
        frac = (x - lo.float()) / (hi.float() - lo.float()).clamp(min=1e-30)
        out = torch.where(frac > u, hi, lo)
        return torch.where(torch.isfinite(lo), out, near)  # beyond fp16's range: what a cast gives
    return x.to(dtype)


def _part(t: torch.Tensor, s, e) -> torch.Tensor:
    """The flat range [s, e) of `t` as a view (writable), or `t` itself when s is None."""
    return t if s is None else t.view(-1)[s:e]


def _is_dtensor(t: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return isinstance(t, DTensor) or isinstance(getattr(t, "data", None), DTensor)


class _State8bit:
    """One Adam moment in 8-bit blockwise form (bitsandbytes' dynamic maps), flat. Blocks of _BLOCK
    values are quantised independently, so a range starting on a block boundary reads and writes on
    its own: the chunked update touches one range at a time."""

    def __init__(self, like: torch.Tensor, signed: bool):
        import bitsandbytes.functional as bnbf

        self.code = bnbf.create_dynamic_map(signed=signed).to(like.device)
        self.shape = tuple(like.shape)
        # zeros written directly (the index bitsandbytes gives a zero block, absmax 0): quantising a whole
        # fp32 zero tensor first would hold 4 bytes a value for a moment (0.57 GB for IF-I-XL's largest weight)
        zero = int(bnbf.quantize_blockwise(torch.zeros(_BLOCK, device=like.device), code=self.code,
                                           blocksize=_BLOCK)[0][0])
        n = like.numel()
        self.q = torch.full((n,), zero, dtype=torch.uint8, device=like.device)
        self.qs = bnbf.QuantState(absmax=torch.zeros(-(-n // _BLOCK), device=like.device), code=self.code,
                                  blocksize=_BLOCK, dtype=torch.float32)

    def get(self, start: int = 0, end: int | None = None) -> torch.Tensor:
        """fp32 values of the flat range [start, end) (start a multiple of the block size)."""
        import bitsandbytes.functional as bnbf

        end = self.q.numel() if end is None else end
        return bnbf.dequantize_blockwise(self.q[start:end], absmax=self.qs.absmax[start // _BLOCK:-(-end // _BLOCK)],
                                         code=self.code, blocksize=_BLOCK)

    def set(self, value: torch.Tensor, start: int = 0):
        import bitsandbytes.functional as bnbf

        end = start + value.numel()
        q, qs = bnbf.quantize_blockwise(value.reshape(-1).contiguous(), code=self.code, blocksize=_BLOCK)
        self.q[start:end].copy_(q)
        self.qs.absmax[start // _BLOCK:-(-end // _BLOCK)].copy_(qs.absmax)

    def to_tensors(self) -> dict:
        """Plain tensors for checkpoints (torch.load(weights_only=True) accepts only those)."""
        return {"q8": self.q, "absmax": self.qs.absmax, "code": self.code, "shape": torch.tensor(self.shape)}

    @classmethod
    def from_tensors(cls, d: dict) -> "_State8bit":
        import bitsandbytes.functional as bnbf

        obj = cls.__new__(cls)
        obj.code, obj.shape = d["code"], tuple(d["shape"].tolist())
        obj.q = d["q8"]
        obj.qs = bnbf.QuantState(absmax=d["absmax"], code=d["code"], blocksize=_BLOCK, dtype=torch.float32)
        return obj


class LowPrecisionAdamW(torch.optim.Optimizer):
    """AdamW with fp32 math for weights of any float dtype. For fp32 weights with fp32 states and
    rounding "nearest" it is exactly torch's AdamW (decoupled weight decay)."""

    def __init__(self, params, lr: float = 1e-4, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 rounding: str = "stochastic", states: str = "fp32", seed: int = 0, chunk: int = 1 << 22):
        if chunk % _BLOCK:
            raise ValueError(f"chunk must be a multiple of {_BLOCK} (the 8-bit block size)")
        if rounding not in ROUNDINGS or states not in STATE_KINDS:
            raise ValueError(f"rounding must be one of {ROUNDINGS}, states one of {STATE_KINDS}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.rounding, self.states, self.chunk = rounding, states, chunk
        self.seed, self.generator = seed, torch.Generator().manual_seed(seed)
        self._device_generators = {}  # "stream@device": rounding bits drawn where the tensors live

    def _init_state(self, p: torch.Tensor) -> dict:
        st = {"step": 0}
        if self.states == "8bit":
            st["m"], st["v"] = _State8bit(p, signed=True), _State8bit(p, signed=False)
        else:
            dt = torch.float32 if self.states == "fp32" else torch.bfloat16
            st["m"], st["v"] = torch.zeros_like(p, dtype=dt), torch.zeros_like(p, dtype=dt)
        if self.rounding == "kahan" and p.dtype != torch.float32:
            # fp32: a compensation in the weight's dtype loses the sub-ulp remainders it exists to keep
            st["comp"] = torch.zeros_like(p, dtype=torch.float32)
        return st

    def _moments(self, st, s, e, shape):
        if self.states == "8bit":
            m, v = st["m"].get(s or 0, e), st["v"].get(s or 0, e)
            return (m.view(shape), v.view(shape)) if s is None else (m, v)
        return _part(st["m"], s, e).float(), _part(st["v"], s, e).float()

    def _store(self, st, m, v, s, e):
        if self.states == "8bit":
            st["m"].set(m, s or 0)
            st["v"].set(v, s or 0)
        elif self.states == "bf16":
            # stochastically rounded: v changes by (1 - beta2) = 1e-3 of itself a step, under bf16's
            # half-ulp (2e-3), so round-to-nearest would freeze it (it never decays after a gradient drop)
            _part(st["m"], s, e).copy_(stochastic_round(m, torch.bfloat16, self._generator(m.device, "m")))
            _part(st["v"], s, e).copy_(stochastic_round(v, torch.bfloat16, self._generator(v.device, "v")))
        else:
            _part(st["m"], s, e).copy_(m)
            _part(st["v"], s, e).copy_(v)

    def _chunks(self, p: torch.Tensor) -> list:
        """Flat [start, end) ranges of the update. Its fp32 scratch (gradient, both moments, the old and
        new weight, rounding bits: ~7 x 4 bytes a value) then exists for one chunk, not for a whole
        tensor: IF-I-XL's largest weight has 143M values, 4 GB of scratch unchunked. A sharded (DTensor)
        or non-contiguous parameter is updated whole: [(None, None)]."""
        if not p.is_contiguous() or _is_dtensor(p):
            return [(None, None)]
        n = p.numel()
        return [(s, min(n, s + self.chunk)) for s in range(0, n, self.chunk)]

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p] if p in self.state else self.state.setdefault(p, self._init_state(p))
                st["step"] += 1
                bc1, bc2 = 1 - b1 ** st["step"], 1 - b2 ** st["step"]
                grad = p.grad if p.grad.is_contiguous() or _is_dtensor(p) else p.grad.contiguous()
                for s, e in self._chunks(p):
                    g = _part(grad, s, e).float()
                    m, v = self._moments(st, s, e, p.shape)
                    m.mul_(b1).add_(g, alpha=1 - b1)
                    v.mul_(b2).addcmul_(g, g, value=1 - b2)
                    del g
                    self._store(st, m, v, s, e)
                    p32 = _part(p, s, e).float()
                    # torch AdamW's order: decay first, then the Adam step
                    new = p32 * (1 - group["lr"] * group["weight_decay"])
                    new.addcdiv_(m, (v.sqrt() / math.sqrt(bc2)).add_(group["eps"]), value=-group["lr"] / bc1)
                    del m, v
                    self._write(_part(p, s, e), p32, new, _part(st["comp"], s, e) if "comp" in st else None)
        return loss

    def _generator(self, device: torch.device, stream: str = "w") -> torch.Generator:
        """One rounding stream per use (the weights, each bf16 moment) and device: separate streams keep
        a chunked update drawing exactly the bits of the whole-tensor one."""
        if device.type == "cpu" and stream == "w":
            return self.generator
        key = f"{stream}@{device}"
        if key not in self._device_generators:
            offset = {"w": 0, "m": 1, "v": 2}[stream]
            self._device_generators[key] = torch.Generator(device).manual_seed((self.seed + offset * 104_729) % 2**63)
        return self._device_generators[key]

    def _write(self, p, old32, new32, comp):
        if p.dtype == torch.float32 or self.rounding == "nearest":
            p.copy_(new32)
        elif self.rounding == "stochastic":
            p.copy_(stochastic_round(new32, p.dtype, self._generator(p.device)))
        else:  # kahan: re-add what earlier roundings lost, remember what this one loses
            wanted = new32 - old32 + comp.float()
            target = old32 + wanted
            p.copy_(target)
            comp.copy_(target - p.float())

    def state_dict(self):
        sd = super().state_dict()
        sd["state"] = {i: {k: ({"__8bit__": v.to_tensors()} if isinstance(v, _State8bit) else v)
                           for k, v in st.items()} for i, st in sd["state"].items()}
        # the rounding generators: a resumed run draws the bits the uninterrupted one would have
        sd["rounding_rng"] = {"cpu": self.generator.get_state(),
                              **{key: g.get_state() for key, g in self._device_generators.items()}}
        return sd

    def load_state_dict(self, state_dict):
        """Restores states in their own dtypes (torch's loader would cast fp32/8-bit moments to the
        parameter's bf16)."""
        from collections import defaultdict

        saved = state_dict["param_groups"]
        by_id = {i: p for sg, g in zip(saved, self.param_groups) for i, p in zip(sg["params"], g["params"])}
        self.state = defaultdict(dict)
        for i, st in state_dict["state"].items():
            p = by_id[i]
            new = {}
            for k, v in st.items():
                if isinstance(v, dict) and "__8bit__" in v:
                    new[k] = _State8bit.from_tensors({kk: t.to(p.device) for kk, t in v["__8bit__"].items()})
                elif k == "step":
                    new[k] = int(v)
                else:
                    new[k] = v.to(p.device) if isinstance(v, torch.Tensor) else v
            self.state[p] = new
        for g, sg in zip(self.param_groups, saved):
            g.update({k: v for k, v in sg.items() if k != "params"})
        for key, rng in state_dict.get("rounding_rng", {}).items():
            stream, _, where = key.rpartition("@") if "@" in key else ("w", "", key)
            self._generator(torch.device(where), stream).set_state(rng.cpu())


def cast_for_model(model, *tensors):
    """Inputs in the dtype of the model's weights (bf16 weights run without autocast on CPU)."""
    dtype = next(model.parameters()).dtype
    return [t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors]


VARIANT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def convert_to_variant(unet_dir, variant: str, max_shard_size: str = "10GB"):
    """Rewrite an exported `unet/` folder's weights as IF's half-precision variant files
    (diffusion_pytorch_model.fp16.safetensors, sharded like diffusers does above 10 GB), loadable with
    `from_pretrained(..., variant="fp16")`. Tensors are read one at a time from the memory-mapped fp32
    files, so the extra memory is the half-precision copy (2 bytes/parameter)."""
    import json
    import os
    from pathlib import Path

    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors import safe_open
    from safetensors.torch import save_file

    unet_dir = Path(unet_dir)
    dtype = VARIANT_DTYPES[variant]
    tensors, metadata = {}, {"format": "pt"}
    sources = sorted(unet_dir.glob("diffusion_pytorch_model*.safetensors"))
    for src in sources:
        with safe_open(str(src), framework="pt") as f:
            tensors.update({k: f.get_tensor(k).to(dtype) for k in f.keys()})
    for old in sources + list(unet_dir.glob("diffusion_pytorch_model*.index.json")):
        os.remove(old)
    split = split_torch_state_dict_into_shards(tensors, max_shard_size=max_shard_size,
                                               filename_pattern=f"diffusion_pytorch_model.{variant}{{suffix}}.safetensors")
    for filename, keys in split.filename_to_tensors.items():
        save_file({k: tensors[k].contiguous() for k in keys}, str(unet_dir / filename), metadata=metadata)
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (unet_dir / f"diffusion_pytorch_model.safetensors.index.{variant}.json").write_text(json.dumps(index, indent=2))
