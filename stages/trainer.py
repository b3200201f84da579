"""The training loop both stages share: accelerate (single/multi-process, mixed precision, gradient
accumulation), hybrid loss with prior preservation, atomic checkpoints, exact resume, validation
grids, loss curves and the final export. What differs per stage lives in a task object
(stage1.Stage1Task, stage2.Stage2Task)."""
from __future__ import annotations

import csv
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from stages import activation_ckpt, checkpoint, engines, setup
from stages.optimizers import factory, low_precision
from stages.caption_dropout import drop_captions
from stages import best as best_ckpt
from stages import validation_log
from stages.divergence import stop_if_diverged
from stages.errors import InputError
from stages.losses import DiffusionMath, diffusion_loss, prior_preservation_split

log = logging.getLogger(__name__)


@dataclass
class Embeddings:
    """T5 embeddings the stage receives (it never loads the text encoder): [1, L, D] each."""
    instance: torch.Tensor
    negative: torch.Tensor
    prior: torch.Tensor | None = None


@dataclass
class TrainResult:
    run_dir: Path
    export_dir: Path | None
    steps: int
    losses: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    validation: list[dict] = field(default_factory=list)  # per validation step: {"step", measure: value}
    best: dict | None = None  # the best-checkpoint choice (step, reason) when that option is on


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """All randomness of one micro-step comes from (seed, step, rank): resuming needs no RNG state,
    and ranks draw different data."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 7919 + rank * 104_729) % (2**63))


def _write_losses(run_dir: Path, rows: list[dict], plot: bool = False):
    """loss.csv at every checkpoint (cheap); the plot only when asked (once, at the end)."""
    if not rows:
        return
    with open(run_dir / "loss.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    if plot:
        plot_losses(rows, run_dir / "loss.png")


def plot_losses(rows: list[dict], path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = [r["step"] for r in rows]
    ax.plot(steps, [r["instance_loss"] for r in rows], label="instance loss")
    if any(r["prior_loss"] != "" for r in rows):
        ax.plot(steps, [r["prior_loss"] if r["prior_loss"] != "" else math.nan for r in rows], label="prior loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def train(task, unet, scheduler, embeds: Embeddings, cfg, run_dir: Path, export_meta: dict,
          resume: bool = False, tracker_config: dict | None = None, validator=None,
          best_rule: best_ckpt.BestRule | None = None) -> TrainResult:
    """Fine-tune `unet` (fp32 master weights) on `task`; `cfg` is a cascade Train config section.

    `validator(model, step, is_main) -> ValidationResult | None`, when given, replaces the stage's own
    validation grid (the caller may chain other stages and measure there); `best_rule`: keep and export
    the validation step its measures pick (stages/best.py) instead of the last step."""
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    run_dir = Path(run_dir)
    ckpt_dir = run_dir / "checkpoints"
    report_to = setup.check_tracker(cfg.report_to)
    accelerator = engines.make_accelerator(cfg, setup.resolve_mixed_precision(cfg.mixed_precision), report_to, run_dir,
                                           extra_handlers=factory.ddp_kwargs(cfg))
    set_seed(cfg.seed)
    if report_to:
        accelerator.init_trackers(f"cascade-stage{task.stage}", config=tracker_config or {})
    attention = setup.set_attention(unet, cfg.attention)
    lora_config = setup.add_lora(unet, cfg.lora_rank, cfg.lora_alpha, **setup.lora_options(cfg)) \
        if cfg.lora_rank > 0 else None
    activation_ckpt.apply(unet, cfg.gradient_checkpointing and cfg.gradient_checkpointing_scope)
    if cfg.compile:
        unet.compile()
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer, lr_sched, opt_name = engines.make_optimizer_and_scheduler(
        accelerator, params, cfg, engines.optimizer_builder(accelerator, cfg))
    per_process_batch = cfg.batch_size * (2 if task.has_prior and cfg.prior_preservation else 1)
    engines.configure_deepspeed(accelerator, unet, cfg, per_process_batch)
    unet, optimizer, lr_sched = accelerator.prepare(unet, optimizer, lr_sched)
    ema = _make_ema(accelerator, params, cfg)  # train.ema: None when off
    in_dtype = engines.input_dtype(accelerator, unet)
    math_ = DiffusionMath(scheduler.alphas_cumprod)
    n_train = scheduler.config.num_train_timesteps
    device = accelerator.device

    start, rows, vrows, best_record = 0, [], [], None
    if resume and (latest := checkpoint.latest_checkpoint(ckpt_dir)) is not None:
        state = checkpoint.load_checkpoint(accelerator, latest, ema)
        start, rows = state["step"], state["losses"]
        vrows, best_record = state.get("validation", []), state.get("best")
        log.info("resumed from %s at step %d", latest, start)
    keeper = best_ckpt.Keeper(best_rule, run_dir / "best", best_record) if best_rule is not None else None
    if keeper is not None and engines.is_sharded(accelerator):
        raise InputError("the best-checkpoint option needs whole weights on the main process; it is not "
                         "available with FSDP/DeepSpeed sharding")
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in params)  # ZeRO-3 leaves empty placeholders
    log.info("stage %d: %s, %d trainable params, %s, precision %s, attention %s, %d process(es), engine %s, "
             "process-group timeout %s", task.stage, "LoRA r=%d" % cfg.lora_rank if lora_config else "full fine-tune",
             n_params, opt_name, accelerator.mixed_precision, attention, accelerator.num_processes,
             accelerator.distributed_type.value, engines.process_group_timeout())

    n_inst = cfg.batch_size
    prior_on = task.has_prior and cfg.prior_preservation
    enc = torch.cat([embeds.instance.expand(n_inst, -1, -1)] +
                    ([embeds.prior.expand(n_inst, -1, -1)] if prior_on else [])).to(device)
    t0 = time.time()
    bar = tqdm(range(start, cfg.max_steps), initial=start, total=cfg.max_steps, desc=f"stage {task.stage}",
               disable=not accelerator.is_local_main_process)
    for step in bar:
        inst_acc = prior_acc = 0.0
        lr_used = float(lr_sched.get_last_lr()[0])  # this step's rate (step_lr then moves it on); torchao: a tensor
        for micro in range(cfg.gradient_accumulation_steps):
            gen = step_generator(cfg.seed, step * cfg.gradient_accumulation_steps + micro, accelerator.process_index)
            batch = task.batch(n_inst, prior_on, gen)
            x0 = batch["x0"].to(device)
            noise = torch.randn(x0.shape, generator=gen).to(device)
            t = torch.randint(0, n_train, (x0.shape[0],), generator=gen).to(device)
            xt = math_.q_sample(x0, noise, t)
            inp, class_labels = task.model_input(xt, batch, gen)
            # per-image captions: the task's rows (instance, then prior) replace the one fixed prompt
            text = batch["encoder_hidden_states"].to(device) if "encoder_hidden_states" in batch else enc
            text = drop_captions(text, embeds.negative, cfg.caption_dropout, gen)[0]  # train.caption_dropout
            inp, text = low_precision.cast_for_model(unet, inp, text)  # bf16/fp16 weights
            if in_dtype is not None:  # DeepSpeed bf16/fp16 casts the module itself
                inp, text = inp.to(in_dtype), text.to(in_dtype)
            with accelerator.accumulate(unet):
                with accelerator.autocast():  # the forward only: autocast's weight copies die with it
                    out = unet(inp, t, encoder_hidden_states=text, class_labels=class_labels,
                               return_dict=False)[0].float()
                    per_ex = diffusion_loss(math_, out, x0, xt, noise, t, cfg.loss, cfg.vlb_weight,
                                            scheduler.config.prediction_type, snr_gamma=cfg.snr_gamma)
                    loss, inst, prior = prior_preservation_split(per_ex, n_inst, cfg.prior_weight)
                # all ranks, before backward: optimizer-in-backward updates the weights during it
                stop_if_diverged(accelerator, loss, task.stage, step + 1, ckpt_dir)
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                    engines.clip_gradients(accelerator, unet, cfg.max_grad_norm)
                optimizer.step()
                engines.step_lr(accelerator, lr_sched)
                if ema is not None and accelerator.sync_gradients and not accelerator.optimizer_step_was_skipped:
                    ema.step()
                optimizer.zero_grad(set_to_none=True)
            inst_acc += inst.item() / cfg.gradient_accumulation_steps
            prior_acc += (prior.item() if prior is not None else 0.0) / cfg.gradient_accumulation_steps
        done = step + 1
        # losses logged per rank-0 batch; ranks see different data but share weights
        rows.append({"step": done, "instance_loss": round(inst_acc, 6),
                     "prior_loss": round(prior_acc, 6) if prior_on else "", "lr": lr_used})
        bar.set_postfix(loss=f"{inst_acc:.4f}")
        if report_to:
            accelerator.log({k: v for k, v in rows[-1].items() if v != ""}, step=done)
        if done % cfg.sample_every == 0 or done == cfg.max_steps:
            tv = time.time()
            vrow = _validate(accelerator, task, unet, scheduler, embeds, cfg, run_dir, done, validator)
            if vrow is not None:
                vrows.append(vrow)
                validation_log.write_csv(run_dir / "validation.csv", vrows)
                log.info("validation step %d (%.2f s)%s", done, time.time() - tv, "".join(
                    f", {k} {v:.4g}" for k, v in vrow.items() if k != "step"))
                if keeper is not None and keeper.offer(vrow, accelerator.unwrap_model(unet)):
                    log.info("best checkpoint so far: %s", keeper.record["reason"])
        if done % cfg.checkpoint_every == 0 or done == cfg.max_steps:
            checkpoint.save_checkpoint(accelerator, ckpt_dir, done, {"step": done, "losses": rows, "validation":
                                       vrows, "best": keeper and keeper.record}, cfg.keep_checkpoints, ema)
            if accelerator.is_main_process:
                _write_losses(run_dir, rows)
    seconds = time.time() - t0
    if accelerator.is_main_process:
        _write_losses(run_dir, rows, plot=True)
        if vrows:
            validation_log.plot(run_dir / "validation.png", rows, vrows, keeper and (keeper.record or {}).get("step"),
                                best_rule and best_rule.budget)
    meta = {**export_meta, "stage": task.stage, "steps": cfg.max_steps, "loss": cfg.loss,
            "lora_rank": cfg.lora_rank, **training_options(cfg)}
    chosen = None
    if keeper is not None:
        accelerator.wait_for_everyone()
        if accelerator.num_processes > 1:  # the main process decided; every rank loads the same weights
            from accelerate.utils import broadcast_object_list

            keeper.record = broadcast_object_list([keeper.record], from_process=0)[0]
        chosen = keeper.restore(accelerator.unwrap_model(unet))
        fallback = "the EMA weights are exported" if ema is not None else "the last step's weights are exported"
        meta["best_checkpoint"] = chosen or {"step": None, "reason": f"no validation step had {best_rule.drift} <= "
                                             f"{best_rule.budget:g}: {fallback}"}
        log.info("best checkpoint: %s", chosen["reason"] if chosen else meta["best_checkpoint"]["reason"])
    if ema is not None and chosen is None:  # the export holds the average, not the last step's weights
        ema.copy_to_model()
        meta.update(weights="ema", ema=ema.metadata())
    elif chosen is not None:  # the validated step's own weights win over the average
        meta["weights"] = "best_checkpoint"
    out = checkpoint.export(unet, accelerator, scheduler, run_dir / "export", meta, lora_config,
                            save_fixed_small=cfg.loss == "epsilon", variant=cfg.export_variant)
    accelerator.wait_for_everyone()
    if keeper is not None and accelerator.is_main_process:
        keeper.prune()
    # every rank reports its weights' checksum: DDP must leave them identical (sharded engines: the
    # checksum of this rank's shard)
    checksum = sum(p.detach().to_local().double().sum().item() if hasattr(p, "to_local") else
                   p.detach().double().sum().item() for p in accelerator.unwrap_model(unet).parameters())
    log.info("rank %d/%d final weights checksum %.10e", accelerator.process_index, accelerator.num_processes,
             checksum)
    if report_to:
        accelerator.end_training()
    log.info("stage %d: %d steps in %.1f s; export %s", task.stage, cfg.max_steps - start, seconds, out)
    return TrainResult(run_dir, out, cfg.max_steps, rows, seconds, vrows, meta.get("best_checkpoint"))


def _make_ema(accelerator, params, cfg):
    """The EMA of the trainable parameters; checkpoints carry it as safetensors + JSON (resume-exact)."""
    if not getattr(cfg, "ema", False):
        return None
    from stages.ema import TrainingEMA, check_engine

    check_engine(engines.engine())
    ema = TrainingEMA(params, cfg.ema_decay, cfg.ema_start_step, cfg.ema_on_cpu)
    log.info("EMA of %d trainable tensors: decay %g from step %d, %.1f MB on %s", len(params), cfg.ema_decay,
             cfg.ema_start_step, ema.bytes() / 1e6, ema.device)
    return ema


def training_options(cfg) -> dict:
    """The issue-20 settings an export records in cascade.json (and its model card shows)."""
    keys = ("learning_rate", "lr_scheduler", "lr_warmup_steps", "optimizer", "snr_gamma", "caption_dropout",
            "lora_type", "lora_targets", "batch_size", "gradient_accumulation_steps", "prior_preservation",
            "prior_weight", "weights_dtype", "mixed_precision", "ema")
    return {"training": {k: getattr(cfg, k) for k in keys if hasattr(cfg, k)}, "weights": "trained"}


def _validate(accelerator, task, unet, scheduler, embeds, cfg, run_dir: Path, step: int, validator=None):
    """The validation row {"step", **scalars} on the main process (None elsewhere or when off)."""
    model, run_here = engines.validation_model(accelerator, unet)  # collective under FSDP/DeepSpeed
    if not run_here or cfg.validation_images < 1:
        return None
    model.eval()
    with accelerator.autocast():
        if validator is not None:
            result = validator(model, step, accelerator.is_main_process)
        else:
            result = validation_log.ValidationResult(task.validation_samples(
                model, scheduler, embeds, cfg.validation_images, cfg.validation_steps,
                torch.Generator().manual_seed(cfg.seed)))
    model.train()
    if not accelerator.is_main_process or result is None:
        return None
    return validation_log.write(accelerator, run_dir, step, result)
