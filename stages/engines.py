"""The distributed engines accelerate offers (DDP, FSDP, DeepSpeed ZeRO), made to fit a loop that
has no dataloader: process-group setup, DeepSpeed's batch/optimizer/scheduler conventions, the LR
schedule stepped once per optimizer step, clipping with the global norm, and weights gathered
collectively for validation and export.

The engine is chosen by `accelerate launch --config_file configs/accelerate/<engine>.yaml`, which
exports ACCELERATE_USE_FSDP / ACCELERATE_USE_DEEPSPEED and the plugin settings; plain `torchrun`
or `accelerate launch` without those gives DDP."""
from __future__ import annotations

import logging
import os
from datetime import timedelta

import torch

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_MINUTES = 120  # torch's default (10 min for NCCL) is shorter than T5 + class images
# ZeRO-1/2 bucket sizes cascade writes when a config names none (accelerate's yaml cannot carry them, and
# DeepSpeed's default of 5e8 elements is a 1 GB bf16 gradient bucket on every GPU): 5e7 elements, 0.1 GB
# at bf16, one reduce bucket (overlap_comm off). The memory planner counts these values.
ZERO_BUCKETS = {"zero_optimization.reduce_bucket_size": 50_000_000,
                "zero_optimization.allgather_bucket_size": 50_000_000,
                "zero_optimization.overlap_comm": False}
_HIDDEN_SIZE_KEYS = ("zero_optimization.reduce_bucket_size", "zero_optimization.stage3_prefetch_bucket_size",
                     "zero_optimization.stage3_param_persistence_threshold")


def engine() -> str:
    """ddp | fsdp | deepspeed, as the launcher's environment asks."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return "deepspeed"
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "fsdp"
    return "ddp"


def _cpu_flag() -> bool:
    """accelerate forms a CPU process group (gloo) only with cpu=True, but cpu=True also switches
    DeepSpeed off; DeepSpeed on a CPU-only machine instead gets backend=gloo (see process_kwargs)."""
    return not torch.cuda.is_available() and engine() != "deepspeed"


def process_kwargs(timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES) -> dict:
    """Arguments for the process group: an explicit timeout (every wait at a barrier, e.g. while the
    main process encodes prompts, must fit in it) and, for DeepSpeed without CUDA, the gloo backend
    (accelerate would otherwise see no backend and count one process while DeepSpeed counts all)."""
    kw = {"timeout": timedelta(minutes=timeout_minutes)}
    if engine() == "deepspeed" and not torch.cuda.is_available() and int(os.environ.get("LOCAL_RANK", -1)) >= 0:
        kw["backend"] = "gloo"
    return kw


def process_state(timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES):
    """The shared accelerate process state; the first call in a process creates the process group."""
    from accelerate import PartialState

    return PartialState(cpu=_cpu_flag(), **process_kwargs(timeout_minutes))


def process_group_timeout() -> timedelta | None:
    """The timeout the live default process group really has (None without one)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    try:
        return dist.group.WORLD._get_backend(torch.device("cpu")).options._timeout
    except (RuntimeError, AttributeError):  # no CPU backend (pure NCCL group)
        return dist.group.WORLD._get_backend(torch.device("cuda")).options._timeout


def main_first(state, fn):
    """Run fn on the main process, then on the others (which then hit its caches)."""
    if state.is_main_process:
        result = fn()
    state.wait_for_everyone()
    if not state.is_main_process:
        result = fn()
    return result


def make_accelerator(cfg, mixed_precision: str, report_to, run_dir, timeout_minutes=DEFAULT_TIMEOUT_MINUTES,
                     extra_handlers=()):
    """The Accelerator for one training run. step_scheduler_with_optimizer=False: accelerate would
    otherwise step a prepared scheduler num_processes times per call (it assumes a dataloader whose
    per-process batches shrink the epoch), so warmup would end N times early on N processes; we
    step it once per optimizer step ourselves (step_lr)."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    return Accelerator(cpu=_cpu_flag(), mixed_precision=mixed_precision,
                       gradient_accumulation_steps=cfg.gradient_accumulation_steps, log_with=report_to,
                       project_dir=str(run_dir), step_scheduler_with_optimizer=False,
                       kwargs_handlers=[InitProcessGroupKwargs(**process_kwargs(timeout_minutes)), *extra_handlers])


def is_sharded(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


# --- DeepSpeed -------------------------------------------------------------------------------------

def _get(conf: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(conf, dict) or part not in conf:
            return None
        conf = conf[part]
    return conf


def _set(conf: dict, dotted: str, value):
    *parents, last = dotted.split(".")
    for part in parents:
        conf = conf.setdefault(part, {})
    conf[last] = value


def fill_deepspeed_config(conf: dict, micro_batch: int, grad_accum: int, world_size: int, max_grad_norm: float,
                          hidden_size: int, client_optimizer: bool) -> dict:
    """Replace the "auto" (or missing) values accelerate can only derive from a dataloader or from a
    transformer's hidden_size, in place. Values the user wrote as numbers are kept, but the batch
    arithmetic DeepSpeed asserts (train = micro x accumulation x world) must hold."""
    def auto(key):
        return _get(conf, key) in (None, "auto")

    if auto("train_micro_batch_size_per_gpu"):
        conf["train_micro_batch_size_per_gpu"] = micro_batch
    if not auto("gradient_accumulation_steps") and conf["gradient_accumulation_steps"] != grad_accum:
        log.warning("deepspeed config gradient_accumulation_steps=%s; using cascade's %d",
                    conf["gradient_accumulation_steps"], grad_accum)
    conf["gradient_accumulation_steps"] = grad_accum  # the loop's micro-steps decide it
    conf["train_batch_size"] = (conf["train_micro_batch_size_per_gpu"] * conf["gradient_accumulation_steps"]
                                * world_size)
    if auto("gradient_clipping"):
        conf["gradient_clipping"] = float(max_grad_norm)  # DeepSpeed clips inside backward; 0 = off
    for key in _HIDDEN_SIZE_KEYS:  # accelerate reads model.config.hidden_size, which a UNet lacks
        if _get(conf, key) == "auto":
            scale = {"reduce_bucket_size": 1.0, "stage3_prefetch_bucket_size": 0.9}.get(key.split(".")[-1])
            _set(conf, key, int(scale * hidden_size ** 2) if scale else 10 * hidden_size)
    if _get(conf, "zero_optimization.stage") in (1, 2):
        for key, value in ZERO_BUCKETS.items():
            if _get(conf, key) is None:
                _set(conf, key, value)
    if _get(conf, "zero_optimization.stage") == 3:
        # the export needs the full weights gathered (accelerator.get_state_dict refuses otherwise)
        _set(conf, "zero_optimization.stage3_gather_16bit_weights_on_model_save", True)
    if client_optimizer and "optimizer" not in conf:
        conf["zero_allow_untested_optimizer"] = True  # e.g. bitsandbytes AdamW8bit
    return conf


def deepspeed_config(accelerator) -> dict | None:
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return plugin.deepspeed_config if plugin is not None else None


def configure_deepspeed(accelerator, unet, cfg, micro_batch: int):
    """Before prepare(): give DeepSpeed the per-process batch (instance + class images) etc."""
    conf = deepspeed_config(accelerator)
    if conf is None:
        return
    hidden = max(getattr(unet.config, "block_out_channels", None) or [1024])
    fill_deepspeed_config(conf, micro_batch, cfg.gradient_accumulation_steps, accelerator.num_processes,
                          cfg.max_grad_norm, hidden, client_optimizer="optimizer" not in conf)
    if getattr(cfg, "offload_optimizer", False):
        # fp32 master weights + Adam states on the host; accelerate swaps torch's AdamW for DeepSpeedCPUAdam
        _set(conf, "zero_optimization.offload_optimizer", {"device": "cpu", "pin_memory": True})
    log.info("deepspeed: zero stage %s, micro batch %d, train batch %d, gradient clipping %s",
             _get(conf, "zero_optimization.stage"), conf["train_micro_batch_size_per_gpu"],
             conf["train_batch_size"], conf["gradient_clipping"])


def optimizer_builder(accelerator, cfg):
    """The `make_optimizer` the trainer and the device check pass below: factory.build with this launch's
    process count, resolved mixed precision and engine (under DeepSpeed the 8-bit AdamW is bitsandbytes')."""
    from stages.optimizers import factory

    deepspeed = deepspeed_config(accelerator) is not None
    return lambda ps, *_: factory.build(ps, cfg, accelerator.num_processes, cfg.seed, accelerator.mixed_precision,
                                        deepspeed=deepspeed)


def make_optimizer_and_scheduler(accelerator, params, cfg, make_optimizer):
    """Our optimizer with the configured LR schedule (stages/schedules.py), unless a DeepSpeed config defines its
    own optimizer/scheduler: then accelerate's placeholders carry our lr/warmup into that config."""
    from stages.schedules import make_schedule

    def schedule(opt):
        return make_schedule(opt, cfg)  # train.lr_scheduler (default constant after warmup)

    conf = deepspeed_config(accelerator) or {}
    if "optimizer" in conf:
        from accelerate.utils import DummyOptim, DummyScheduler  # exported only where deepspeed is installed

        optimizer, name = DummyOptim(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay), "deepspeed-config"
        if "scheduler" in conf:
            # accelerate divides total_num_steps by the process count (it assumes a dataloader split across
            # processes); the loop makes max_steps optimizer steps on every process, so undo that division
            total = cfg.max_steps * getattr(accelerator, "num_processes", 1)
            return optimizer, DummyScheduler(optimizer, total_num_steps=total,
                                             warmup_num_steps=cfg.lr_warmup_steps), name
        # DeepSpeed builds the optimizer, so it must build (and step) our schedule on it too
        return optimizer, DummyScheduler(optimizer, lr_scheduler_callable=schedule), name
    optimizer, name = make_optimizer(params, cfg.learning_rate, cfg.weight_decay, cfg.use_8bit_adam)
    if "scheduler" in conf:
        from stages.errors import InputError

        raise InputError("the DeepSpeed config defines a scheduler but no optimizer; define both or neither")
    return optimizer, schedule(optimizer), name


def step_lr(accelerator, lr_sched):
    """Once per optimizer step (not per micro-step, not per process). Under DeepSpeed the engine
    steps the schedule inside backward() and the prepared wrapper ignores this call."""
    if accelerator.sync_gradients and not accelerator.optimizer_step_was_skipped:
        lr_sched.step()


def clip_gradients(accelerator, unet, max_norm: float):
    """Through the *prepared* model's parameters: accelerate matches them against the wrapped model
    to use FSDP's global norm; the pre-prepare list would hold stale tensors (FSDP2 swaps in
    sharded parameters, so it has no gradients) or give per-shard norms (FSDP1)."""
    return accelerator.clip_grad_norm_(unet.parameters(), max_norm)


def input_dtype(accelerator, unet) -> torch.dtype | None:
    """DeepSpeed bf16/fp16 casts the module itself (no autocast): inputs must match its dtype."""
    if deepspeed_config(accelerator) is None:
        return None
    dtype = next(accelerator.unwrap_model(unet).parameters()).dtype
    return dtype if dtype != torch.float32 else None


# --- collective use of sharded weights --------------------------------------------------------------

def validation_model(accelerator, unet):
    """(model, run_here): sharded weights can only be used by all ranks together (every forward
    all-gathers the shards), so under FSDP/DeepSpeed every rank samples with the prepared model and
    the main process writes; otherwise the main process alone uses the unwrapped model."""
    if is_sharded(accelerator):
        model = unet if engine() == "fsdp" else accelerator.unwrap_model(unet)
        return model, True
    return accelerator.unwrap_model(unet), accelerator.is_main_process


def with_fp32_masters(accelerator, unet, state_dict: dict) -> dict:
    """Under DeepSpeed with the optimizer offloaded, the module holds bf16/fp16 copies of the fp32
    master weights: a fine-tune of ~1 bf16 ulp per weight lives only in the masters, so the export
    takes them (safe_get_full_fp32_param; collective across ranks). Otherwise `state_dict` as is."""
    conf = deepspeed_config(accelerator) or {}
    if (_get(conf, "zero_optimization.offload_optimizer.device") or "none") == "none":
        return state_dict
    from deepspeed.utils import safe_get_full_fp32_param

    out = dict(state_dict)
    for name, p in accelerator.unwrap_model(unet).named_parameters():
        master = safe_get_full_fp32_param(p)
        if master is not None and name in out:
            out[name] = master.detach().float().cpu()
    return out


def save_full_unet(accelerator, unet, state_dict: dict, folder):
    """Main process only, with `state_dict` gathered collectively (accelerator.get_state_dict) by
    every rank. Sharded engines: the weights go into a fresh copy of the model built on the meta
    device (no second allocation) and saved by diffusers' save_pretrained, so the folder has exactly
    one consistent form (one file, or shards + index above 10 GB), never a mix."""
    model = accelerator.unwrap_model(unet)
    if not is_sharded(accelerator):
        model.save_pretrained(folder, safe_serialization=True)
        return
    with torch.device("meta"):
        fresh = type(model).from_config(model.config)
    missing, unexpected = fresh.load_state_dict(state_dict, strict=False, assign=True)
    if missing or unexpected:
        raise RuntimeError(f"gathered state dict does not match the UNet: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")
    fresh.save_pretrained(folder, safe_serialization=True)
