"""Typed run configuration: YAML presets, validation with errors that name the key, dotted overrides.

The dataclass defaults are the `tiny` preset, so the offline default needs no file at all.
"""
from __future__ import annotations

import copy
import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from stages.errors import InputError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
SEED_MAX = 2**32 - 1  # seeds + image index + stage offsets stay far inside torch's signed 64-bit seeds


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
    noise_aug_max: int = 0  # the paper lowers SR augmentation 1e-3 -> 1e-5: IF level 0 is the closest (docs/sr-study.md)
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
    # trainer features (issue 20; docs/training-options.md): all off / as before by default
    lr_scheduler: str = "constant_with_warmup"  # constant|constant_with_warmup|linear|cosine|cosine_with_restarts|polynomial
    lr_num_cycles: int = 1  # cosine_with_restarts: hard restarts
    lr_power: float = 1.0  # polynomial: decay power (1 = linear to 1e-7)
    snr_gamma: float = 0.0  # min-SNR-gamma weighting of the epsilon/v MSE (Hang et al. 2023: 5); 0 = off
    caption_dropout: float = 0.0  # probability a training row gets the empty prompt (classifier-free guidance)
    optimizer: str = "adamw"  # adamw|adamw8bit|adafactor|prodigy (use_8bit_adam=true is adamw8bit)
    lora_type: str = "lora"  # lora|dora (weight-decomposed LoRA, peft use_dora)
    lora_targets: str = ""  # comma-separated attention module names; empty = to_q,to_k,to_v,to_out.0,add_k_proj,add_v_proj
    ema: bool = False  # keep an exponential moving average of the trained weights; the export takes it
    ema_decay: float = 0.9999  # the EMA's decay cap (diffusers EMAModel: warms up as (1+n)/(10+n))
    ema_start_step: int = 0  # optimizer steps before the EMA starts averaging (it copies the weights until then)
    ema_on_cpu: bool = False  # hold the EMA copy in host memory (device memory saved; a copy per step)


@dataclass
class Sample:
    steps: int = 10
    guidance_scale: float = 7.0
    noise_level: int = -1  # stage II/III only; -1 = the stage's default (trained level or 250)
    batch_size: int = 4


@dataclass
class Validation:
    """Validation while training (docs/validation.md); the grid size and interval are train.validation_*."""
    # stage I: through stage II at its size; stage II: also upsample stage I's "a <class>" samples. Off in
    # the tiny/toy presets (CPU: the chain's stage II sampling costs more than the training), on in if-*
    chain: bool = False
    chain_model: str = ""  # the other stage for the chain: "" = the base model of models.stage2 / models.stage1
    measures: bool = True  # live DreamBooth measures when available (toy readers; DINO/CLIP-I in the local cache)
    holdout: int = 0  # stage II: subject photos held out of training and upsampled at validation
    best_checkpoint: bool = False  # export the validation step with the highest best_fidelity within drift_budget
    best_fidelity: str = "fidelity"  # measure to maximise
    best_drift: str = "drift"  # measure that must stay <= drift_budget
    drift_budget: float = 1.0


@dataclass
class Stage:
    train: Train = field(default_factory=Train)
    sample: Sample = field(default_factory=Sample)
    validation: Validation = field(default_factory=Validation)


def _stage2_default() -> Stage:
    return Stage(train=Train(learning_rate=1e-4, batch_size=1, prior_preservation=False, num_class_images=4),
                 sample=Sample(steps=10, guidance_scale=4.0))


@dataclass
class Study:
    """`cascade study-sr` defaults, each replaced by its flag. The defaults size the tiny preset's sweep to a
    few minutes on 2 CPU cores (its images are noise: this checks the plumbing); the if-* presets and toy
    set the full grid (docs/sr-study.md)."""
    variants: str = "aug0=0:0 aug250=250:250"  # NAME=MIN:MAX[:prior], space-separated
    noise_levels: str = "0,250"  # sampling noise levels, comma-separated
    seeds: str = "0,1,2"
    max_steps: int = 5  # fine-tuning steps per variant; 0 = stage2.train.max_steps
    sample_steps: int = 2  # SR sampling steps; 0 = stage2.sample.steps
    max_images: int = 3  # real photos used (training + held-out)
    num_stage1: int = 1  # stage I samples of "a [V] <class>" upsampled
    class_images: int = 1  # base stage I "a <class>" samples upsampled (drift)


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
    study: Study = field(default_factory=Study)
    # train settings per engine (cascade/compat.py names them: ddp, fsdp2, zero2, zero2-offload, zero3),
    # applied to both stages when the launcher runs that engine, before flags and --set: a preset
    # carries the variant each shipped accelerate config needs (docs/engines.md)
    engine_settings: dict = field(default_factory=dict)

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
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "null",
             list: "a list", dict: "a mapping"}
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    return names.get(tp, getattr(tp, "__name__", str(tp)))


_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,39}$")


def _merge(obj, data: dict, where: str, prefix: str = "", from_file: bool = False):
    """Merge `data` into the dataclass `obj`. Values read from a file (`from_file`) are never quoted
    in an error, only their type: the UI lets anyone name any readable file as the preset."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: '{prefix.rstrip('.') or 'top level'}' must be a mapping")
    hints = typing.get_type_hints(type(obj))
    for key, value in data.items():
        dotted = prefix + str(key)
        if key not in hints:
            if from_file and not _KEY.match(str(key)):  # not a setting's name: say where, not what
                raise ConfigError(f"{where}: an unknown config key under '{prefix.rstrip('.') or 'top level'}'")
            raise ConfigError(f"{where}: unknown config key '{dotted}'")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _merge(current, value, where, dotted + ".", from_file)
            continue
        allowed = _allowed(hints[key])
        if float in allowed and isinstance(value, str):
            try:  # YAML 1.1 reads "1e-5" (no dot) as a string
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) and bool not in allowed or not isinstance(value, allowed):
            got = type_name(type(value)) if from_file else repr(value)
            raise ConfigError(f"{where}: '{dotted}' must be {type_name(hints[key])}, got {got}", dotted)
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
    if tp is not None and str in _allowed(tp):  # never YAML: "!weird" is a name, not a YAML tag
        quoted = len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\""
        nullable = type(None) in _allowed(tp) and raw.strip() in ("null", "~", "Null", "NULL")
        value = None if nullable else raw[1:-1] if quoted else raw
        _merge(cfg, _nested(parts, value), f"--set {key}")
        return ".".join(parts)
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {key}: value {raw!r} is not valid YAML ({str(e).splitlines()[0]})") from None
    _merge(cfg, _nested(parts, value), f"--set {key}")
    return ".".join(parts)


def yaml_where(e: yaml.YAMLError) -> str:
    """Where a YAML file is broken, in one line that quotes none of its content (the file may be any
    file the user can read): "at line L, column C (what the parser found)", quoted text elided."""

    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    where = f"at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "(no position given)"
    # the parser's token names ('<scalar>', ',', '}') are kept; any other quoted text is elided
    keep = re.compile(r"'(<[a-z ]+>|[^\w\s]{1,2})'")
    problem = re.sub(r"'[^']*'|\"[^\"]*\"", lambda m: m[0] if keep.fullmatch(m[0]) else "…",
                     str(getattr(e, "problem", "") or ""))
    problem = " ".join(problem.split())
    return where + (f" ({problem[:120]})" if problem else "")


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
                flags: list[tuple[str, str, object]] | None = None, engine: str | None = None) -> Config:
    """Preset/YAML (with its engine_settings for `engine`, default: the launcher's), then typed `flags`
    (flag name, dotted key, value), then `--set` overrides. An invalid value is reported with the flag
    or `--set` the user typed, when it came from one."""
    cfg = Config()
    if path is not None:
        p = resolve_path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML {yaml_where(e)}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None
        _merge(cfg, data, str(p), from_file=True)
        _apply_engine_settings(cfg, str(p), engine)
    source = {}
    for flag, key, value in flags or []:
        set_value(cfg, key, value, flag)
        source[key] = flag
    for item in overrides or []:
        source[_set_override(cfg, item)] = f"--set {item.split('=', 1)[0].strip()}"
    from cascade.config_checks import validate

    try:
        validate(cfg, engine)
    except ConfigError as e:
        if e.key in source:
            raise ConfigError(f"{source[e.key]}: {e.detail} (config key {e.key})", e.key, e.detail) from None
        raise _unquoted(e, cfg) from None
    return cfg


def _unquoted(e: ConfigError, cfg: Config) -> ConfigError:
    """A check's error about a value that came from the config file, with the value's text left out:
    the checks quote the value (which helps for a typed flag), but a file's text is never shown."""
    value = cfg
    for part in (e.key or "").split("."):
        value = getattr(value, part, None)
    if not isinstance(value, str):
        return e
    text = re.sub(r"'([^']*)'", lambda m: "<text from the file>" if m.group(1) and m.group(1) in value else m.group(0),
                  str(e))
    return ConfigError(text, e.key, e.detail)


def _apply_engine_settings(cfg: Config, where: str, engine: str | None = None):
    """Every engine's entry is checked (a typo fails on any machine); this process's engine's is applied."""
    from cascade import compat

    engine = engine or compat.current_engine()
    for name, settings in cfg.engine_settings.items():
        if name not in compat.ENGINES:
            raise ConfigError(f"{where}: engine_settings.{name}: not an engine ({'|'.join(compat.ENGINES)})")
        for stage in ("stage1", "stage2"):
            _merge(copy.deepcopy(getattr(cfg, stage).train), settings, where, f"engine_settings.{name}.", True)
            if name == engine:
                _merge(getattr(cfg, stage).train, settings, where, f"engine_settings.{name}.", True)


def given_keys(path: str | Path | None = None, overrides: list[str] | None = None) -> dict[str, tuple[int, str]]:
    """Where each setting a user gave came from: dotted key -> (rank, source), rank 1 for the config file
    (its path) and 2 for `--set` (which load_config applies last); keys absent are the dataclass defaults
    (rank 0). For settings that stand in for one another (study.max_steps, stage2.train.max_steps), so
    the one the user actually gave wins. Call after load_config has validated the same arguments."""
    out: dict[str, tuple[int, str]] = {}

    def walk(data, prefix, source):
        for key, value in data.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.", source)
            else:
                out[prefix + str(key)] = (1, source)

    if path is not None:
        p = resolve_path(path)
        walk(yaml.safe_load(p.read_text(encoding="utf-8")) or {}, "", str(p))
    for item in overrides or []:
        key = item.split("=", 1)[0].strip()
        out[key] = (2, f"--set {key}")
    return out


def dump_config(cfg: Config, path: Path):
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
