"""Validation of a resolved configuration: every value in range and every combination allowed,
each refusal a ConfigError that names the key (load_config adds the flag the user typed)."""
from __future__ import annotations

import math

from cascade import compat
from cascade.config import SEED_MAX, Config, ConfigError, Sample, Train, Validation


def _check(ok: bool, key: str, msg: str):
    if not ok:
        raise ConfigError(f"config '{key}': {msg}", key, msg)


def validate(cfg: Config, engine: str | None = None):
    """`engine`: the one the training will run on (default: what the launcher exported; cascade/compat.py)."""
    _check(cfg.models.dtype in ("float32", "float16", "bfloat16"), "models.dtype", "float32|float16|bfloat16")
    _check(cfg.models.variant in (None, "fp16", "bf16"), "models.variant", "null, fp16 or bf16")
    _check(cfg.models.text_encoder_device in ("auto", "cpu"), "models.text_encoder_device", "auto|cpu")
    _check(1 <= cfg.max_text_length <= 512, "max_text_length", "must be in 1..512")
    _check(cfg.distributed_timeout_minutes > 0, "distributed_timeout_minutes", "must be > 0")
    ident = cfg.identifier
    _check(0 <= ident.min_id < ident.max_id, "identifier.min_id", "must be >= 0 and below identifier.max_id")
    _check(ident.max_chars >= 1, "identifier.max_chars", "must be >= 1")
    _check(0 <= ident.seed <= SEED_MAX, "identifier.seed", f"must be an integer in 0..{SEED_MAX}, got {ident.seed}")
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
        _check(t.lora_rank >= 0, k + "lora_rank", "must be >= 0 (0 = full fine-tuning)")
        _check(t.prior_weight >= 0, k + "prior_weight", "must be >= 0")
        _check(t.num_class_images >= 1, k + "num_class_images", "must be >= 1")
        _check(t.loss in ("hybrid", "epsilon"), k + "loss", "hybrid|epsilon")
        _check(t.vlb_weight >= 0, k + "vlb_weight", "must be >= 0")
        _check(t.checkpoint_every >= 1, k + "checkpoint_every", "must be >= 1")
        _check(t.sample_every >= 1, k + "sample_every", "must be >= 1")
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
        _check(0 <= t.seed <= SEED_MAX, k + "seed", f"must be an integer in 0..{SEED_MAX}, got {t.seed}")
        _check_features(t, k)
        refused = compat.check_train(t, k, engine)  # the table of what composes
        if refused is not None:
            _check(False, refused[0], refused[1])
        _check(math.isfinite(s.guidance_scale) and s.guidance_scale >= 0, f"{stage}.sample.guidance_scale",
               "must be >= 0")
        _check(s.steps >= 1, f"{stage}.sample.steps", "must be >= 1")
        _check(s.batch_size >= 1, f"{stage}.sample.batch_size", "must be >= 1")
        _check(-1 <= s.noise_level <= 999, f"{stage}.sample.noise_level", "must be -1 (default) or in 0..999")
        _check_validation(getattr(cfg, stage).validation, f"{stage}.validation.", stage == "stage2")
    _check(-1 <= cfg.stage3.noise_level <= 350, "stage3.noise_level", "x4 upscaler accepts 0..350 (-1 = default)")
    _check(cfg.stage3.steps >= 1 and cfg.stage3.batch_size >= 1, "stage3.steps", "steps and batch_size must be >= 1")
    _check(math.isfinite(cfg.stage3.guidance_scale) and cfg.stage3.guidance_scale >= 0, "stage3.guidance_scale",
           "must be >= 0")
    _check(bool(str(cfg.models.cache_dir).strip()), "models.cache_dir", "must name a folder")
    _check_study(cfg)


def _check_study(cfg: Config):
    from cascade import study_grid

    st = cfg.study
    for key, parse, value in (("variants", study_grid.variants, st.variants.split()),
                              ("noise_levels", study_grid.levels, st.noise_levels), ("seeds", study_grid.seeds, st.seeds)):
        try:
            parse(value)
        except ValueError as e:
            _check(False, f"study.{key}", str(e))
    _check(st.max_steps >= 0, "study.max_steps", "must be >= 0 (0 = stage2.train.max_steps)")
    _check(st.sample_steps >= 0, "study.sample_steps", "must be >= 0 (0 = stage2.sample.steps)")
    _check(st.max_images >= 1, "study.max_images", "must be >= 1")
    _check(st.num_stage1 >= 0 and st.class_images >= 0, "study.num_stage1", "num_stage1 and class_images must be >= 0")


def _check_features(t: Train, k: str):
    """The issue-20 trainer features: schedules, min-SNR, caption dropout, optimizers, DoRA, EMA."""
    import re

    from stages.schedules import SCHEDULES

    _check(t.lr_scheduler in SCHEDULES, k + "lr_scheduler", "|".join(SCHEDULES))
    _check(t.lr_num_cycles >= 1, k + "lr_num_cycles", "must be >= 1")
    _check(math.isfinite(t.lr_power) and t.lr_power > 0, k + "lr_power", "must be > 0")
    _check(t.lr_scheduler != "polynomial" or t.learning_rate > 1e-7, k + "learning_rate",
           "the polynomial schedule decays to 1e-7: learning_rate must be above it")
    _check(t.lr_warmup_steps < t.max_steps or t.lr_scheduler in ("constant", "constant_with_warmup"),
           k + "lr_warmup_steps", f"must be below max_steps for the {t.lr_scheduler} schedule")
    _check(math.isfinite(t.snr_gamma) and t.snr_gamma >= 0, k + "snr_gamma", "must be >= 0 (0 = off; 5 is usual)")
    _check(0.0 <= t.caption_dropout < 1.0, k + "caption_dropout", "must be a probability in [0, 1)")
    _check(t.optimizer in ("adamw", "adamw8bit", "adafactor", "prodigy"), k + "optimizer",
           "adamw|adamw8bit|adafactor|prodigy")
    _check(not (t.use_8bit_adam and t.optimizer not in ("adamw", "adamw8bit")), k + "use_8bit_adam",
           f"conflicts with optimizer={t.optimizer} (use_8bit_adam means optimizer=adamw8bit)")
    if t.optimizer == "adamw8bit" or t.use_8bit_adam:  # two spellings of one setting, kept in step
        t.optimizer, t.use_8bit_adam = "adamw8bit", True
    _check(t.lora_type in ("lora", "dora"), k + "lora_type", "lora|dora")
    _check(t.lora_type == "lora" or t.lora_rank > 0, k + "lora_type",  # rank 0 is a full fine-tune: no adapter
           f"{t.lora_type} is an adapter of lora_rank > 0, but {k}lora_rank is 0 (a full fine-tune); set "
           f"{k}lora_rank (e.g. 8), or lora_type lora for a full fine-tune")
    names = [n.strip() for n in t.lora_targets.split(",")] if t.lora_targets.strip() else []
    _check(all(re.fullmatch(r"[A-Za-z_][\w.]*", n) for n in names), k + "lora_targets",
           f"comma-separated module names such as to_q,to_v, got {t.lora_targets!r}")
    _check(math.isfinite(t.ema_decay) and 0.0 < t.ema_decay < 1.0, k + "ema_decay", "must be in (0, 1), e.g. 0.9999")
    _check(t.ema_start_step >= 0, k + "ema_start_step", "must be >= 0")
def _check_validation(v: Validation, k: str, stage2: bool):
    _check(v.holdout >= 0, k + "holdout", "must be >= 0")
    _check(stage2 or v.holdout == 0, k + "holdout", "only stage II holds subject photos out (stage I validates on prompts)")
    _check(math.isfinite(v.drift_budget), k + "drift_budget", "must be a finite number")
    _check(bool(v.best_fidelity.strip()) and bool(v.best_drift.strip()), k + "best_fidelity",
           "best_fidelity and best_drift must name measures")
