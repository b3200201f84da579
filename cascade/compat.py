"""What composes: the one table of training options that interact, as a short list of rules.

A cell is one choice per axis (engine, optimizer, weights dtype, optimizer-state dtype, in-backward,
offload, adapter, EMA, mixed precision). `verdict(cell)` is None when the cell runs, else the
one-line reason it is refused, naming both settings at fault. `cells()` walks every combination
(tests/test_compat.py trains a covering set of the running ones on their real engines);
config_checks.validate consults `check_train` before any model loads or folder is made. A rule may
refuse a cell only where an optional package is missing (FSDP2 + 8-bit AdamW runs on torchao's), so
how many cells run depends on the extras installed.

The engine comes from the launcher's environment (what `accelerate launch --config_file
configs/accelerate/X.yaml` exports), so a preset is checked against the engine it will run on."""
from __future__ import annotations

import importlib.util
import itertools
import json
import os
from dataclasses import asdict, dataclass

ENGINES = ("single", "ddp", "fsdp2", "zero2", "zero2-offload", "zero3")
DEEPSPEED = ("zero2", "zero2-offload", "zero3")
AXES = {
    "engine": ENGINES,
    "optimizer": ("adamw", "adamw8bit", "prodigy", "adafactor"),
    "weights": ("float32", "bfloat16", "float16"),
    "states": ("fp32", "bf16"),  # 8-bit states are optimizer=adamw8bit
    "in_backward": (False, True),
    "offload": (False, True),
    "adapter": ("none", "lora", "dora"),
    "ema": (False, True),
    "mixed_precision": ("no", "bf16", "fp16"),
}
# how each axis is spelled in a refusal: the setting the user can change
SETTING = {"engine": "engine", "optimizer": "train.optimizer", "weights": "train.weights_dtype",
           "states": "train.optimizer_states", "in_backward": "train.optimizer_in_backward",
           "offload": "train.offload_optimizer", "adapter": "train.lora_type", "ema": "train.ema",
           "mixed_precision": "train.mixed_precision"}
# the config key a refusal is filed under (load_config names the --set flag when the user typed it)
KEY = {a: SETTING[a].split(".", 1)[1] for a in SETTING if a != "engine"}  # no rule names the engine first


@dataclass(frozen=True)
class Cell:
    engine: str = "single"
    optimizer: str = "adamw"
    weights: str = "float32"
    states: str = "fp32"
    in_backward: bool = False
    offload: bool = False
    adapter: str = "none"
    ema: bool = False
    mixed_precision: str = "no"

    def describe(self, axis: str) -> str:
        value = getattr(self, axis)
        if axis == "engine":
            return f"engine {value}"
        return f"{SETTING[axis]}={str(value).lower() if isinstance(value, bool) else value}"


def installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


@dataclass(frozen=True)
class Rule:
    axes: tuple[str, str]  # the two settings the refusal names (the first is the key it is filed under)
    when: object  # Cell -> bool: the cell is refused
    why: str
    unless_installed: str | None = None  # an optional package that makes the cell run (the why names its extra)

    def refuses(self, cell: Cell) -> bool:
        return self.when(cell) and (self.unless_installed is None or not installed(self.unless_installed))


_LOW = ("bfloat16", "float16")


def _offload_rules(axis: str, bad, why: str) -> tuple[Rule, Rule]:
    """The optimizer is offloaded by train.offload_optimizer or by the accelerate config itself
    (deepspeed-zero2-offload.yaml): the refusal names whichever of the two did it."""
    return (Rule((axis, "offload"), lambda c: c.offload and bad(c), why),
            Rule((axis, "engine"), lambda c: c.engine == "zero2-offload" and not c.offload and bad(c), why))


RULES = (
    Rule(("offload", "engine"), lambda c: c.offload and c.engine not in DEEPSPEED,
         "the optimizer offload runs through DeepSpeed ZeRO-Offload: launch with "
         "configs/accelerate/deepspeed-zero2-offload.yaml"),
    Rule(("offload", "engine"), lambda c: c.offload and c.engine == "zero3",
         "ZeRO-3 with the optimizer offloaded hung (a gloo send timed out) in the CPU walk and is untested on "
         "GPUs; use configs/accelerate/deepspeed-zero2-offload.yaml"),
    *_offload_rules("optimizer", lambda c: c.optimizer != "adamw",
                    "accelerate replaces any optimizer with DeepSpeedCPUAdam under offload, so it would silently "
                    "run Adam; offload only plain AdamW"),
    *_offload_rules("states", lambda c: c.states != "fp32",
                    "DeepSpeedCPUAdam keeps fp32 states (and its own decay): bf16 states would silently be replaced"),
    *_offload_rules("weights", lambda c: c.weights != "float32",
                    "ZeRO-Offload keeps fp32 master weights on the host; use weights_dtype=float32"),
    Rule(("in_backward", "engine"), lambda c: c.in_backward and c.engine in DEEPSPEED,
         "the in-backward step frees each gradient before DeepSpeed's own hook reads it (crash at step 1)"),
    Rule(("in_backward", "engine"), lambda c: c.in_backward and c.engine in ("ddp", "fsdp2"),
         "the per-parameter step would run before the gradients are reduced across processes"),
    Rule(("weights", "engine"), lambda c: c.weights in _LOW and c.engine == "fsdp2",
         "accelerate's FSDP2 upcasts trainable parameters to fp32 DTensors: 8-bit/bf16 states crash on them "
         "and bf16 master weights silently become fp32; use weights_dtype=float32"),
    Rule(("optimizer", "engine"), lambda c: c.optimizer in ("prodigy", "adafactor") and c.engine == "fsdp2",
         "FSDP2's parameters are DTensors, which Prodigy and Adafactor mix with plain tensors (crash at step 1); "
         "use DeepSpeed ZeRO or DDP"),
    Rule(("optimizer", "engine"), lambda c: c.optimizer == "adamw8bit" and c.engine == "fsdp2",
         "FSDP2's parameters are DTensors, which of the 8-bit AdamWs only torchao's steps (bitsandbytes' has no "
         "sharding rule: crash at step 1); pip install 'cascade-dreambooth[torchao]'", unless_installed="torchao"),
    Rule(("optimizer", "engine"), lambda c: c.optimizer == "adamw8bit" and c.engine in DEEPSPEED,
         "ZeRO takes per-parameter views of the optimizer state at offsets torchao's 8-bit blocks refuse "
         "(crash at step 1), so 8-bit AdamW under DeepSpeed is bitsandbytes'; pip install "
         "'cascade-dreambooth[bnb]'", unless_installed="bitsandbytes"),
    Rule(("states", "engine"), lambda c: c.states == "bf16" and c.engine == "fsdp2",
         "the bf16 moments are plain tensors, FSDP2's parameters DTensors (crash at step 1)"),
    Rule(("optimizer", "engine"), lambda c: c.optimizer == "adafactor" and c.engine in DEEPSPEED,
         "DeepSpeed hands the optimizer flat partitions, so Adafactor's per-matrix factoring and update "
         "clipping act on one long vector (its 2-step update was 36% off Adafactor's); use DDP"),
    Rule(("optimizer", "engine"), lambda c: c.optimizer == "prodigy" and c.engine in DEEPSPEED,
         "each process would estimate Prodigy's step size from its own shard (prodigyopt sums the estimate "
         "over shards only on CUDA, untested here); use DDP"),
    Rule(("weights", "engine"), lambda c: c.weights in _LOW and c.engine in DEEPSPEED,
         "DeepSpeed keeps its own fp32 master weights (set mixed_precision=bf16 for a 16-bit module); "
         "use weights_dtype=float32"),
    Rule(("weights", "mixed_precision"), lambda c: c.weights == "float16" and c.mixed_precision == "fp16",
         "fp16 mixed precision's gradient scaler cannot unscale fp16 gradients (fails at step 1); "
         "use mixed_precision=bf16 or no"),
    Rule(("weights", "mixed_precision"), lambda c: (c.weights, c.mixed_precision) in (("float16", "bf16"),
                                                                                     ("bfloat16", "fp16")),
         "autocast to the other 16-bit type over these weights fails in IF's attention pooling (torch.cat: "
         "'Unexpected floating ScalarType'); use the weights' own type or mixed_precision=no"),
    Rule(("in_backward", "mixed_precision"), lambda c: c.in_backward and c.mixed_precision == "fp16",
         "the scaled gradients would step unscaled and inf steps would not be skipped; use bf16"),
    Rule(("optimizer", "weights"), lambda c: c.optimizer in ("prodigy", "adafactor") and c.weights != "float32",
         "the low-precision weight update is for AdamW; use weights_dtype=float32"),
    Rule(("states", "optimizer"), lambda c: c.states == "bf16" and c.optimizer != "adamw",
         "bf16 moments are for plain AdamW (8-bit AdamW keeps 8-bit states, the others their own)"),
    Rule(("in_backward", "optimizer"), lambda c: c.in_backward and c.optimizer == "prodigy",
         "Prodigy estimates one step size over all parameters, so it cannot step one parameter at a time"),
    Rule(("ema", "engine"), lambda c: c.ema and c.engine in ("fsdp2",) + DEEPSPEED,
         "the EMA averages whole weights, which are sharded there; switch ema off or use DDP"),
)


def verdict(cell: Cell) -> str | None:
    """None when the cell runs, else 'A and B: reason' for the first rule that refuses it."""
    for rule in RULES:
        if rule.refuses(cell):
            a, b = rule.axes
            return f"{cell.describe(a)} and {cell.describe(b)}: {rule.why}"
    return None


def refusing_rule(cell: Cell) -> Rule | None:
    return next((r for r in RULES if r.refuses(cell)), None)


def cells():
    """Every combination of the axes, in a fixed order."""
    for values in itertools.product(*AXES.values()):
        yield Cell(*values)


def table() -> list[tuple[Cell, str | None]]:
    return [(c, verdict(c)) for c in cells()]


# --- the engine the launcher chose, and a config's cell on it ------------------------------------------------

def _deepspeed_file_settings(path: str) -> tuple[int | None, str | None]:
    """(zero stage, offload device) from a deepspeed_config_file (JSON), where it sets them."""
    try:
        conf = json.loads(open(path, encoding="utf-8").read())
    except (OSError, ValueError):
        return None, None
    zero = conf.get("zero_optimization") or {}
    return zero.get("stage"), (zero.get("offload_optimizer") or {}).get("device")


def current_engine(env=None) -> str:
    """The engine of this process, from what `accelerate launch` (or torchrun) exported."""
    env = os.environ if env is None else env
    if env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        stage, offload = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE"), env.get(
            "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE")
        if env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE"):
            file_stage, file_offload = _deepspeed_file_settings(env["ACCELERATE_DEEPSPEED_CONFIG_FILE"])
            stage, offload = file_stage if file_stage is not None else stage, file_offload or offload
        if str(stage) == "3":
            return "zero3"
        return "zero2-offload" if (offload or "none").lower() not in ("none", "") else "zero2"
    if env.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "fsdp2"
    return "ddp" if int(env.get("WORLD_SIZE", "1") or 1) > 1 else "single"


def accelerate_file_engine(path) -> str:
    """The engine an accelerate config file launches (the environment `accelerate launch` would export)."""
    import yaml

    conf = yaml.safe_load(open(path, encoding="utf-8").read()) or {}
    ds = conf.get("deepspeed_config") or {}
    env = {"WORLD_SIZE": str(conf.get("num_processes", 1)),
           "ACCELERATE_USE_DEEPSPEED": str(conf.get("distributed_type") == "DEEPSPEED").lower(),
           "ACCELERATE_USE_FSDP": str(conf.get("distributed_type") == "FSDP").lower(),
           "ACCELERATE_DEEPSPEED_ZERO_STAGE": str(ds.get("zero_stage", "")),
           "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": str(ds.get("offload_optimizer_device", "none")),
           "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(ds.get("deepspeed_config_file", ""))}
    return current_engine(env)


def resolved_precision(setting: str) -> str:
    """mixed_precision as the trainer will run it for the table: auto becomes what this machine picks
    (fp16 on a GPU without bf16); an explicit fp16 is judged as asked, wherever it runs."""
    if setting != "auto":
        return setting
    import torch

    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


def cell_of(train, engine: str | None = None) -> Cell:
    """The cell a Train config section runs in on `engine` (default: this process's)."""
    optimizer = "adamw8bit" if train.use_8bit_adam else train.optimizer
    adapter = "none" if train.lora_rank == 0 else train.lora_type
    return Cell(engine or current_engine(), optimizer, train.weights_dtype, train.optimizer_states,
                bool(train.optimizer_in_backward), bool(train.offload_optimizer), adapter, bool(train.ema),
                resolved_precision(train.mixed_precision))


def check_train(train, prefix: str, engine: str | None = None) -> tuple[str, str] | None:
    """(config key, one-line reason) when the section's cell is refused, else None."""
    cell = cell_of(train, engine)
    rule = refusing_rule(cell)
    if rule is None:
        return None
    return prefix + KEY[rule.axes[0]], verdict(cell)


def as_dict(cell: Cell) -> dict:
    return asdict(cell)
