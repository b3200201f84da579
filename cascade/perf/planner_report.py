"""`cascade bench --estimate-memory`: the planner's table, the whole-command phases and the fit verdict."""
from __future__ import annotations

import logging
import time
from dataclasses import replace

from cascade.perf import arch, command_plan, planner
from cascade.perf.bench import device_name, git_revision, versions

log = logging.getLogger(__name__)

# the option combinations of the table (rows per model)
COMBOS = {
    "naive": ("naive (fp32, no ckpt, AdamW)", dict()),
    "before": ("before #11 (fp32, resnet ckpt, 8-bit Adam)", dict(checkpointing="resnets", use_8bit_adam=True)),
    "preset": ("preset (bf16 SR, full ckpt, 8-bit Adam in backward)",
               dict(weights_dtype="bfloat16", checkpointing="full", use_8bit_adam=True, in_backward=True)),
    "lora": ("LoRA r8 (bf16 base, full ckpt, AdamW)", dict(weights_dtype="bfloat16", checkpointing="full", lora_rank=8)),
}


T5_TO_CPU = "models.text_encoder_device=cpu (T5 runs once on the CPU, minutes; its embeddings are cached)"


def advise_validation(plan, step: dict, val, rest: dict, gpu: float, inference=None) -> list[dict]:
    """Ways to bring the validation phases under the budget: the chain off (no partner resident;
    stage II then upsamples only the photos), or fewer validation images (halved until it fits);
    each with T5 moved to the CPU too when T5 is then the peak over the budget.
    [{switch_on, command_peak, fits}]; the first that fits is the advice."""
    kw = {"inference": inference} if inference else {}
    stage = val.stage
    options = []
    trials = ([(f"stage{stage}.validation.chain=false", replace(val, partner=None))] if val.partner else []) + \
        [(f"stage{stage}.train.validation_images={k}", replace(val, images=k))
         for k in sorted({max(1, val.images // 2 ** i) for i in range(1, 8)}, reverse=True) if k < val.images]
    for text, v in trials:
        phases = {k: x for k, x in rest.items() if not k.startswith("validation")}
        phases.update(command_plan.validation_phases(plan, step, v, **kw))
        if max(phases, key=phases.get) == "t5_encode" and phases["t5_encode"] and not planner.fits(phases["t5_encode"], gpu)[0]:
            text, phases["t5_encode"] = f"{text} + {T5_TO_CPU}", 0
        peak = max(phases.values())
        options.append({"switch_on": text, "command_peak": peak, "fits": planner.fits(peak, gpu)[0]})
        if options[-1]["fits"] and "validation_images" in text:
            break  # the largest validation grid that fits
    return options


def advise_command(plan, phases: dict, placement: str, gpu: float, ddp: bool, trace=None, step=None, val=None,
                   inference=None) -> dict:
    """What to switch on when the command's peak phase does not fit: T5 to the CPU when the T5 phase is
    the peak and over the budget; when a validation phase is then the peak, the validation options
    (advise_validation: chain off, fewer images); the training-step ladder only if the training step
    is still over it (halving the batch cannot help a peak that is T5's or validation's).
    {switch_on, plan (the traced step or None), fits, command_peak, validation_options}."""
    switched, rest = [], dict(phases)
    others = max(v for k, v in rest.items() if k != "t5_encode")
    if placement == "gpu" and rest["t5_encode"] > others and not planner.fits(rest["t5_encode"], gpu)[0]:
        switched.append(T5_TO_CPU)
        rest["t5_encode"] = 0
    if planner.fits(max(rest.values()), gpu)[0]:
        return {"switch_on": switched, "plan": None, "fits": True, "command_peak": max(rest.values())}
    peak_phase = max(rest, key=rest.get)
    if peak_phase.startswith("validation") and val is not None and planner.fits(rest["train_step"], gpu)[0]:
        options = advise_validation(plan, step, val, rest, gpu, inference)
        best = next((o for o in options if o["fits"]), None)
        return {"switch_on": switched + ([best["switch_on"]] if best else []), "plan": None, "fits": best is not None,
                "command_peak": best["command_peak"] if best else max(rest.values()), "validation_options": options}
    better, more, result = planner.advise(plan, gpu, trace or planner.trace_step, ddp=ddp)
    options = None
    if better is not None:  # the step fits now; the other phases scale with the weights, not the batch
        rest["train_step"] = result["bytes"]["peak"]
        over = max(rest, key=rest.get)
        if over.startswith("validation") and val is not None and not planner.fits(rest[over], gpu)[0]:
            options = advise_validation(plan, step, val, rest, gpu, inference)  # then validation's options
            fit = next((o for o in options if o["fits"]), None)
            more, better = (more + [fit["switch_on"]], better) if fit else (more, None)
            if fit:
                return {"switch_on": switched + more, "plan": result, "fits": True,
                        "command_peak": fit["command_peak"], "validation_options": options}
        elif not planner.fits(max(rest.values()), gpu)[0]:
            better = None
    return {"switch_on": switched + more, "plan": result if better is not None else None,
            "fits": better is not None, "command_peak": max(rest.values()),
            **({"validation_options": options} if options else {})}


def validation_plan(cfg, stage: int):
    """What validation samples during `cascade train` of `stage` (None: no validation grid)."""
    sec = cfg.stage1 if stage == 1 else cfg.stage2
    if sec.train.validation_images < 1 or sec.train.sample_every < 1:
        return None
    partner = None
    if sec.validation.chain:
        base = cfg.models.stage2 if stage == 1 else cfg.models.stage1
        # a chain_model folder fine-tuned from the base stage has the base's architecture
        partner = arch.arch_for(sec.validation.chain_model or base) or arch.arch_for(base) or f"tiny-stage{3 - stage}"
    return command_plan.ValidationPlan(stage, sec.train.validation_images, partner, cfg.models.dtype,
                                       max(1, sec.validation.holdout), cfg.stage1.sample.batch_size)


def plan_from_config(cfg, stage: int, batch: int | None, cpu_run: bool, resolution: int | None = None) -> planner.Plan:
    sec = cfg.stage1 if stage == 1 else cfg.stage2
    tc = sec.train
    model_id = cfg.models.stage1 if stage == 1 else cfg.models.stage2
    name = arch.arch_for(model_id) or f"tiny-stage{stage}"
    return planner.Plan(name, batch or tc.batch_size, bool(tc.prior_preservation), tc.weights_dtype,
                       (tc.gradient_checkpointing_scope if tc.gradient_checkpointing else "none"), tc.use_8bit_adam,
                       tc.optimizer_states, tc.optimizer_in_backward, tc.lora_rank,
                       None if cpu_run else "bfloat16", resolution=resolution,
                       offload=bool(getattr(tc, "offload_optimizer", False)))


def _gb(x: float) -> str:
    return f"{x / planner.GB:.1f}"


def table(models: list[str], batch: int, combos: list[str] | None = None) -> tuple[list[dict], str]:
    rows, lines = [], ["| model | options | params | grads | optimizer | activations at peak | peak (GB) |",
                       "|---|---|---|---|---|---|---|"]
    for model in models:
        for key in combos or list(COMBOS):
            label, opts = COMBOS[key]
            t0 = time.time()
            r = planner.trace_step(planner.Plan(model, batch, True, **opts))
            b = r["bytes"]
            rows.append({"model": model, "combo": label, **r, "trace_seconds": time.time() - t0})
            lines.append(f"| {model} | {label} | {_gb(b['params'])} | {_gb(b['grads'])} | {_gb(b['optimizer'])} | "
                         f"{_gb(b['activations_at_peak'])} | **{_gb(b['peak'])}** |")
            log.info("%s / %s: peak %.2f GB (%.0f s)", model, label, b["peak"] / planner.GB, time.time() - t0)
    return rows, "\n".join(lines)


def run(cfg, args) -> dict:
    report = {"device_planned_for": "cpu (no autocast)" if args.cpu_run else "CUDA GPU (bf16 autocast)",
              "planned_on": device_name(), "command": "cascade bench --estimate-memory " + " ".join(
                  a for a in (f"--config {args.config}" if args.config else "", f"--stage {args.stage}",
                              f"--models {args.models}" if args.models else "",
                              f"--batch {args.batch}" if args.batch else "",
                              f"--gpu-memory {args.gpu_memory}" if args.gpu_memory else "",
                              f"--resolution {args.resolution}" if args.resolution else "",
                              f"--processes {args.processes}" if getattr(args, "processes", 1) > 1 else "",
                              "--cpu-run" if args.cpu_run else "",
                              *(f"--set {o}" for o in getattr(args, "overrides", []))) if a),
              "versions": versions(), "git": git_revision()}
    if args.models:
        models = [m.strip() for m in args.models.split(",") if m.strip()]
        for m in models:
            arch.load(m)  # unknown names fail here, before any tracing
        combos = [c.strip() for c in args.combos.split(",")] if args.combos else None
        if combos and not set(combos) <= set(COMBOS):
            from stages.errors import InputError

            raise InputError(f"--combos: choose from {', '.join(COMBOS)}")
        rows, md = table(models, args.batch or 4, combos)
        report.update(rows=rows, markdown=md)
        return report
    plan = plan_from_config(cfg, args.stage, args.batch, args.cpu_run, args.resolution)
    ddp = getattr(args, "processes", 1) > 1
    if ddp:
        plan = planner.ddp_plan(plan)
    step = planner.trace_step(plan)
    sec = cfg.stage1 if args.stage == 1 else cfg.stage2
    if args.cpu_run:  # the training step of a `cascade bench` CPU run (what peak RSS measures)
        report.update(plan=step, markdown=f"{plan.model}, {plan.label()}, batch {plan.batch} (+prior), "
                      f"resolution {plan.resolution or 'native'}, CPU: training step peak {_gb(step['bytes']['peak'])} GB")
        return report
    placement = "cpu" if cfg.models.text_encoder_device == "cpu" else "gpu"
    val = validation_plan(cfg, args.stage)
    phases = command_plan.command_phases(plan, step, cfg.models.dtype, sec.sample.batch_size, val, placement)
    ema_host = {}
    if sec.train.ema:  # the EMA copy (issue 20) on the device, or in host memory with ema_on_cpu
        phases, ema_host = command_plan.with_ema(phases, step, sec.train.ema_on_cpu)
    peak_phase = max(phases, key=phases.get)
    t5_options = {p: command_plan.t5_device_bytes(plan.model, cfg.models.dtype, p) for p in ("gpu", "8bit", "cpu")}
    report.update(plan=step, phases=phases, peak_phase=peak_phase, command_peak=phases[peak_phase],
                  t5_placement=placement, t5_options=t5_options, processes=getattr(args, "processes", 1))
    lines = [f"{plan.model}, {'one of ' + str(args.processes) + ' DDP processes, ' if ddp else ''}"
             f"batch {plan.batch}{' + ' + str(plan.batch) + ' prior' if plan.prior else ''}, "
             f"{plan.label()}: training step peak {_gb(step['bytes']['peak'])} GB "
             f"(params {_gb(step['bytes']['params'])}, grads {_gb(step['bytes']['grads'])}, optimizer "
             f"{_gb(step['bytes']['optimizer'])}, activations {_gb(step['bytes']['activations_at_peak'])})",
             *([f"EMA copy {_gb(step['params_trainable'] * 4)} GB on the device, in every phase from training on"]
               if sec.train.ema and not sec.train.ema_on_cpu else []),
             *([f"EMA in host RAM (ema_on_cpu): peak {_gb(ema_host['ema_host_peak'])} GB (the fp32 shadow and each "
                f"step's fp32 host copy of the weights), {_gb(ema_host['ema_traffic_per_step'])} GB copied from the "
                "device every step"] if ema_host else []),
             *([f"validation: {val.own_batch()} images by the trained model"
                + (f", then {val.partner} ({val.partner_dtype}) samples {val.partner_images()} at once while the "
                   "training state stays on the device" if val.partner else "")] if val else []),
             "phases (GB): " + ", ".join(f"{k} {_gb(v)}" for k, v in phases.items()) +
             f"; command peak {_gb(phases[peak_phase])} GB in {peak_phase}",
             f"T5 ({placement}; models.text_encoder_device): {cfg.models.dtype} on the GPU {_gb(t5_options['gpu'])} GB, "
             f"8-bit {_gb(t5_options['8bit'])} GB, on the CPU 0 GB"]
    if args.gpu_memory:
        gpu = planner.parse_size(args.gpu_memory)
        ok, headroom = planner.fits(phases[peak_phase], gpu)
        report["fits"] = ok
        if ok:
            lines.append(f"fits {args.gpu_memory}: {_gb(headroom)} GB to spare (after 1 GiB context + 5% slack)")
        else:
            report["advice"] = advice = advise_command(plan, phases, placement, gpu, ddp, step=step, val=val)
            short = f"does NOT fit {args.gpu_memory} (short by {_gb(-headroom)} GB)"
            if not advice["fits"]:
                lines.append(f"{short}, even with {', '.join(advice['switch_on']) or 'every option'}: "
                             "use LoRA or a larger GPU")
            else:
                lines.append(f"{short}; switch on: {', '.join(advice['switch_on'])} -> command peak "
                             f"{_gb(advice['command_peak'])} GB")
            for o in advice.get("validation_options", []):
                lines.append(f"  validation option {o['switch_on']}: command peak {_gb(o['command_peak'])} GB, "
                             + ("fits" if o["fits"] else "does not fit"))
    # host RAM at export: safetensors builds each file in memory (the whole state dict), then the fp16
    # variant is converted from the written file (a half-precision copy)
    full = plan.lora_rank == 0
    host = (step["params_total"] * command_plan.DTYPE_BYTES[plan.weights_dtype] if full else 0) + \
        (step["params_total"] * 2 if full and sec.train.export_variant != "none" else 0)
    report["host_export_bytes"] = host
    report["host_ema"] = ema_host
    if step.get("host_bytes"):
        lines.append(f"host RAM for ZeRO-Offload: {_gb(step['host_bytes'])} GB (fp32 master weights, Adam moments, "
                     "fp32 gradient copy)")
    if host:
        variant = sec.train.export_variant
        lines.append(f"host RAM for the export: up to {_gb(host)} GB (the state dict is written from memory"
                     + (f", then the {variant} variant is converted from the file)" if variant != "none" else ")"))
    report["markdown"] = "\n".join(lines)
    return report
