"""The run configuration's schema: one dataclass per section, with the defaults and a comment on each key.

The defaults are the `tiny` preset, so the offline default needs no file at all. Loading, overrides and
their errors are cascade/config.py's.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


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

