"""Typed run configuration: YAML presets, validation with errors that name the key, dotted overrides.

The dataclass defaults are the `tiny` preset, so the offline default needs no file at all.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from stages.errors import InputError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


class ConfigError(InputError):
    """A bad configuration value; the message names the key (and file or flag) at fault."""

    def __init__(self, message: str, key: str | None = None, detail: str | None = None):
        super().__init__(message)
        self.key, self.detail = key, detail


@dataclass
class Models:
    stage1: str = "tiny"  # hub id or local diffusers folder; "tiny" = built locally on first use
    stage2: str = "tiny"
    stage3: str = "none"  # x4 upscaler hub id/folder, "tiny", or "none"
    text_encoder: str = ""  # folder/hub id with text_encoder/ + tokenizer/; empty = same as stage1
    variant: str | None = None  # "fp16" for the DeepFloyd hub weights
    dtype: str = "float32"  # dtype of frozen weights used for sampling: float32|float16|bfloat16
    # auto: T5 runs on the GPU when there is one; cpu: on the CPU in fp32 (19 GB host RAM), once per
    # prompt set (the embedding cache), so T5-XXL's 11.6 GB never share the GPU (minutes, not seconds)
    text_encoder_device: str = "auto"
    cache_dir: str = "~/.cache/cascade"  # tiny components and text-embedding cache


@dataclass
class Identifier:
    token: str = ""  # user-given identifier; empty = pick a rare token
    seed: int = 0
    min_id: int = 3000  # rare-token id range; the paper's 5000-10000 in if-*.yaml (the tiny vocab has ~4.6k)
    max_id: int = 4400
    max_chars: int = 3


@dataclass
class Train:
    max_steps: int = 20
    batch_size: int = 2  # instance images per step (plus as many class images with prior preservation)
    learning_rate: float = 1e-4
    lr_warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False
    mixed_precision: str = "auto"  # auto|no|bf16|fp16 (auto: bf16/fp16 on CUDA, no on CPU)
    use_8bit_adam: bool = False
    attention: str = "sdpa"  # sdpa|xformers
    lora_rank: int = 0  # 0 = full fine-tuning
    lora_alpha: float = 0.0  # 0 = same as rank
    prior_preservation: bool = True
    prior_weight: float = 1.0
    num_class_images: int = 8
    loss: str = "hybrid"  # hybrid (epsilon MSE + learned-variance bound) | epsilon (saves fixed_small)
    vlb_weight: float = 1.0  # weight of the single-timestep bound term (= lambda 1/T on the full bound)
    checkpoint_every: int = 10
    keep_checkpoints: int = 2
    sample_every: int = 10
    validation_images: int = 2
    validation_steps: int = 10  # sampler steps for validation grids
    seed: int = 0
    report_to: str = "none"  # none|tensorboard|wandb
    hflip: bool = False
    # stage II only: noise augmentation of the low-res condition, an integer level in 0..999
    noise_aug_min: int = 0
    noise_aug_max: int = 0  # the paper lowers SR augmentation to ~0 (1e-3 -> 1e-5 = IF levels ~1 -> 0)
    random_crop: bool = False  # random 256 crops of larger photos (condition from the same crop)
    crop_source_size: int = 320  # short side the photo is resized to before random cropping
    allow_upscale: bool = False  # accept photos smaller than the stage resolution (upscaled, warned)
    captions: str = "none"  # none (one "a [V] <class>" prompt) | sidecar (<image>.txt) | metadata (metadata.jsonl)
    # memory/speed switches (issue 11; `cascade bench --estimate-memory` shows what each saves)
    weights_dtype: str = "float32"  # float32|bfloat16|float16: the UNet's weights (trainable and frozen/LoRA base)
    bf16_update: str = "stochastic"  # stochastic|kahan|nearest: how a low-precision weight takes its fp32 update
    optimizer_states: str = "fp32"  # fp32|bf16 Adam moments (use_8bit_adam: 8-bit blockwise)
    optimizer_in_backward: bool = False  # step each parameter in backward, never hold all gradients (1 process)
    # fp32 master weights and Adam states in host memory (DeepSpeed ZeRO-Offload: launch with
    # configs/accelerate/deepspeed-zero2-offload.yaml); the GPU holds the bf16 module and gradient buckets
    offload_optimizer: bool = False
    gradient_checkpointing_scope: str = "full"  # full: ResNets + attention + mid block | resnets: diffusers' own
    fused_optimizer: bool = True  # torch's fused AdamW where the device has it (fp32 weights, no 8-bit)
    ddp_bucket_view: bool = True  # DDP gradient_as_bucket_view: gradients live in the all-reduce buckets
    compile: bool = False  # torch.compile the UNet (first steps slower; GPU)
    export_variant: str = "none"  # fp16|bf16: export weights as IF's variant files (half the size); none: fp32


@dataclass
class Sample:
    steps: int = 10
    guidance_scale: float = 7.0
    noise_level: int = -1  # stage II/III only; -1 = the stage's default (trained level or 250)
    batch_size: int = 4


@dataclass
class Stage:
    train: Train = field(default_factory=Train)
    sample: Sample = field(default_factory=Sample)


def _stage2_default() -> Stage:
    return Stage(train=Train(learning_rate=1e-4, batch_size=1, prior_preservation=False, num_class_images=4),
                 sample=Sample(steps=10, guidance_scale=4.0))


@dataclass
class Config:
    name: str = "tiny"
    models: Models = field(default_factory=Models)
    identifier: Identifier = field(default_factory=Identifier)
    max_text_length: int = 77
    # multi-process runs: how long a rank may wait at a barrier (e.g. while the main process loads
    # T5 and encodes prompts) before the process group gives up; torch's NCCL default is 10 minutes
    distributed_timeout_minutes: float = 120.0
    stage1: Stage = field(default_factory=Stage)
    stage2: Stage = field(default_factory=_stage2_default)
    stage3: Sample = field(default_factory=lambda: Sample(steps=10, guidance_scale=9.0, noise_level=100))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _allowed(tp) -> tuple:
    """Python types a YAML value may have for a field annotation."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return tuple(t for a in typing.get_args(tp) for t in _allowed(a))
    if tp is float:
        return (float, int)
    if tp is type(None):
        return (type(None),)
    return (tp,)


def type_name(tp) -> str:
    """A readable name for a field annotation ("an integer", not "<class 'int'>")."""
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "null"}
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _merge(obj, data: dict, where: str, prefix: str = ""):
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: '{prefix.rstrip('.') or 'top level'}' must be a mapping")
    hints = typing.get_type_hints(type(obj))
    for key, value in data.items():
        dotted = prefix + str(key)
        if key not in hints:
            raise ConfigError(f"{where}: unknown config key '{dotted}'")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _merge(current, value, where, dotted + ".")
            continue
        allowed = _allowed(hints[key])
        if float in allowed and isinstance(value, str):
            try:  # YAML 1.1 reads "1e-5" (no dot) as a string
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) and bool not in allowed or not isinstance(value, allowed):
            raise ConfigError(f"{where}: '{dotted}' must be {type_name(hints[key])}, got {value!r}", dotted)
        setattr(obj, key, float(value) if allowed[0] is float and not isinstance(value, bool) else value)


def _field_type(cfg: Config, parts: list[str]):
    """The annotation of a dotted key, or None when the key does not exist (then _merge names it)."""
    obj = cfg
    for part in parts[:-1]:
        obj = getattr(obj, part, None)
        if not dataclasses.is_dataclass(obj):
            return None
    return typing.get_type_hints(type(obj)).get(parts[-1])


def _nested(parts: list[str], value) -> dict:
    nested: dict = {}
    cursor = nested
    for part in parts[:-1]:
        cursor = cursor.setdefault(part, {})
    cursor[parts[-1]] = value
    return nested


def _set_override(cfg: Config, item: str) -> str:
    """Apply one `--set key=value`: the value is YAML, except for string settings, which keep the
    text as typed (YAML would cut "models #1" at the '#', or make "on" a boolean). Returns the key."""
    if "=" not in item:
        raise ConfigError(f"--set '{item}': expected key=value")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    tp = _field_type(cfg, parts)
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {key}: value {raw!r} is not valid YAML ({str(e).splitlines()[0]})") from None
    if tp is not None and str in _allowed(tp) and not (value is None and type(None) in _allowed(tp)):
        quoted = len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\""
        value = raw[1:-1] if quoted else raw
    _merge(cfg, _nested(parts, value), f"--set {key}")
    return ".".join(parts)


def set_value(cfg: Config, key: str, value, flag: str):
    """Set a typed value from a command-line flag (no YAML); errors name the flag."""
    _merge(cfg, _nested(key.split("."), value), flag)


def resolve_path(name: str | Path) -> Path:
    """A preset name (tiny, if-xl) or a YAML path."""
    p = Path(name)
    if p.suffix in (".yaml", ".yml") or p.exists():
        return p
    return CONFIG_DIR / f"{name}.yaml"


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                flags: list[tuple[str, str, object]] | None = None) -> Config:
    """Preset/YAML, then typed `flags` (flag name, dotted key, value), then `--set` overrides. An
    invalid value is reported with the flag or `--set` the user typed, when it came from one."""
    cfg = Config()
    if path is not None:
        p = resolve_path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML ({e})") from None
        _merge(cfg, data, str(p))
    source = {}
    for flag, key, value in flags or []:
        set_value(cfg, key, value, flag)
        source[key] = flag
    for item in overrides or []:
        source[_set_override(cfg, item)] = f"--set {item.split('=', 1)[0].strip()}"
    try:
        validate(cfg)
    except ConfigError as e:
        if e.key in source:
            raise ConfigError(f"{source[e.key]}: {e.detail} (config key {e.key})", e.key, e.detail) from None
        raise
    return cfg


def _check(ok: bool, key: str, msg: str):
    if not ok:
        raise ConfigError(f"config '{key}': {msg}", key, msg)


def validate(cfg: Config):
    _check(cfg.models.dtype in ("float32", "float16", "bfloat16"), "models.dtype", "float32|float16|bfloat16")
    _check(cfg.models.variant in (None, "fp16", "bf16"), "models.variant", "null, fp16 or bf16")
    _check(cfg.models.text_encoder_device in ("auto", "cpu"), "models.text_encoder_device", "auto|cpu")
    _check(1 <= cfg.max_text_length <= 512, "max_text_length", "must be in 1..512")
    _check(cfg.distributed_timeout_minutes > 0, "distributed_timeout_minutes", "must be > 0")
    ident = cfg.identifier
    _check(0 <= ident.min_id < ident.max_id, "identifier.min_id", "must be >= 0 and below identifier.max_id")
    _check(ident.max_chars >= 1, "identifier.max_chars", "must be >= 1")
    for stage in ("stage1", "stage2"):
        t: Train = getattr(cfg, stage).train
        s: Sample = getattr(cfg, stage).sample
        k = f"{stage}.train."
        _check(t.max_steps >= 1, k + "max_steps", "must be >= 1")
        _check(t.batch_size >= 1, k + "batch_size", "must be >= 1")
        _check(t.learning_rate > 0, k + "learning_rate", "must be > 0")
        _check(t.gradient_accumulation_steps >= 1, k + "gradient_accumulation_steps", "must be >= 1")
        _check(t.mixed_precision in ("auto", "no", "bf16", "fp16"), k + "mixed_precision", "auto|no|bf16|fp16")
        _check(t.attention in ("sdpa", "xformers"), k + "attention", "sdpa|xformers")
        _check(t.weights_dtype in ("float32", "bfloat16", "float16"), k + "weights_dtype", "float32|bfloat16|float16")
        _check(t.bf16_update in ("stochastic", "kahan", "nearest"), k + "bf16_update", "stochastic|kahan|nearest")
        _check(t.optimizer_states in ("fp32", "bf16"), k + "optimizer_states", "fp32|bf16 (8-bit: use_8bit_adam)")
        _check(t.gradient_checkpointing_scope in ("full", "resnets"), k + "gradient_checkpointing_scope",
               "full|resnets")
        _check(t.export_variant in ("none", "fp16", "bf16"), k + "export_variant", "none|fp16|bf16")
        _check(not (t.optimizer_in_backward and t.gradient_accumulation_steps > 1), k + "optimizer_in_backward",
               "cannot be combined with gradient_accumulation_steps > 1")
        _check(not t.offload_optimizer or (t.weights_dtype == "float32" and not t.use_8bit_adam
                                            and not t.optimizer_in_backward),
               k + "offload_optimizer", "keeps fp32 master weights in host memory: needs weights_dtype=float32, "
               "use_8bit_adam=false and optimizer_in_backward=false")
        _check(not (t.optimizer_in_backward and t.mixed_precision == "fp16"), k + "optimizer_in_backward",
               "cannot be combined with mixed_precision=fp16 (its gradients would step unscaled and inf steps "
               "would not be skipped); use bf16")
        _check(t.lora_rank >= 0, k + "lora_rank", "must be >= 0 (0 = full fine-tuning)")
        _check(t.prior_weight >= 0, k + "prior_weight", "must be >= 0")
        _check(t.num_class_images >= 1, k + "num_class_images", "must be >= 1")
        _check(t.loss in ("hybrid", "epsilon"), k + "loss", "hybrid|epsilon")
        _check(t.vlb_weight >= 0, k + "vlb_weight", "must be >= 0")
        _check(t.checkpoint_every >= 1 and t.sample_every >= 1, k + "checkpoint_every", "intervals must be >= 1")
        _check(t.report_to in ("none", "tensorboard", "wandb"), k + "report_to", "none|tensorboard|wandb")
        _check(t.captions in ("none", "sidecar", "metadata"), k + "captions", "none|sidecar|metadata")
        rule = f"noise levels must satisfy 0 <= noise_aug_min <= noise_aug_max <= 999, got {t.noise_aug_min}..{t.noise_aug_max}"
        _check(0 <= t.noise_aug_max <= 999, k + "noise_aug_max", rule)
        _check(0 <= t.noise_aug_min <= t.noise_aug_max, k + "noise_aug_min", rule)
        for key in ("learning_rate", "weight_decay", "max_grad_norm", "lora_alpha", "prior_weight", "vlb_weight"):
            _check(math.isfinite(getattr(t, key)), k + key, "must be a finite number")
        _check(t.lr_warmup_steps >= 0, k + "lr_warmup_steps", "must be >= 0")
        _check(t.weight_decay >= 0, k + "weight_decay", "must be >= 0")
        _check(t.max_grad_norm >= 0, k + "max_grad_norm", "must be >= 0 (0 = no clipping)")
        _check(t.lora_alpha >= 0, k + "lora_alpha", "must be >= 0 (0 = same as lora_rank)")
        _check(t.keep_checkpoints >= 0, k + "keep_checkpoints", "must be >= 0 (0 = keep all)")
        _check(t.validation_images >= 0, k + "validation_images", "must be >= 0 (0 = no validation grids)")
        _check(t.validation_steps >= 1, k + "validation_steps", "must be >= 1")
        _check(t.seed >= 0, k + "seed", "must be >= 0")
        _check(math.isfinite(s.guidance_scale) and s.guidance_scale >= 0, f"{stage}.sample.guidance_scale",
               "must be >= 0")
        _check(s.steps >= 1, f"{stage}.sample.steps", "must be >= 1")
        _check(s.batch_size >= 1, f"{stage}.sample.batch_size", "must be >= 1")
        _check(-1 <= s.noise_level <= 999, f"{stage}.sample.noise_level", "must be -1 (default) or in 0..999")
    _check(-1 <= cfg.stage3.noise_level <= 350, "stage3.noise_level", "x4 upscaler accepts 0..350 (-1 = default)")
    _check(cfg.stage3.steps >= 1 and cfg.stage3.batch_size >= 1, "stage3.steps", "steps and batch_size must be >= 1")
    _check(math.isfinite(cfg.stage3.guidance_scale) and cfg.stage3.guidance_scale >= 0, "stage3.guidance_scale",
           "must be >= 0")
    _check(bool(str(cfg.models.cache_dir).strip()), "models.cache_dir", "must name a folder")


def dump_config(cfg: Config, path: Path):
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
