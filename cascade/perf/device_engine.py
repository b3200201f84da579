"""One engine cell of the device check, in its own process (`accelerate launch --config_file
configs/accelerate/<engine>.yaml --num_processes 1 -m cascade.perf.device_engine CELL_JSON`): the
trainer's engine setup (stages/trainer.py: accelerator, optimizer and schedule, DeepSpeed's filled
config, prepare, accelerator.backward) around the device check's synthetic step. Prints one line
`DEVICE_CHECK {json}` for the parent."""
from __future__ import annotations

import json
import math
import statistics
import sys
import tempfile
import time

import torch


def main(arg: str) -> dict:
    from cascade.perf import device_check
    from cascade.perf.step import synthetic_batch
    from stages import activation_ckpt, engines, setup
    from stages.optimizers import factory, low_precision

    spec = json.loads(arg)
    cell = device_check.Cell(**{**spec["cell"], "overrides": tuple(spec["cell"]["overrides"])})
    plan = device_check.plan_for(cell, spec["size"], None)
    cfg = device_check._config(cell)
    tc = (cfg.stage1 if cell.stage == 1 else cfg.stage2).train
    with tempfile.TemporaryDirectory() as run_dir:
        acc = engines.make_accelerator(tc, setup.resolve_mixed_precision(tc.mixed_precision), None, run_dir,
                                       extra_handlers=factory.ddp_kwargs(tc))
        if acc.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        unet = device_check._build(plan, acc.device)
        activation_ckpt.apply(unet, plan.checkpointing)
        unet.train()
        params = [p for p in unet.parameters() if p.requires_grad]
        opt, sched, opt_name = engines.make_optimizer_and_scheduler(
            acc, params, tc, engines.optimizer_builder(acc, tc))
        n = plan.batch * (2 if plan.prior else 1)
        engines.configure_deepspeed(acc, unet, tc, n)
        unet, opt, sched = acc.prepare(unet, opt, sched)
        in_dtype = engines.input_dtype(acc, unet)
        gen = torch.Generator().manual_seed(0)
        times, losses = [], []
        for i in range(spec["steps"] + 1):
            x, t, enc, labels = (v if v is None else v.to(acc.device) for v in synthetic_batch(
                unet.config if hasattr(unet, "config") else unet.module.config, n, plan.text_len, generator=gen,
                resolution=plan.resolution))
            x, enc = low_precision.cast_for_model(unet, x, enc)  # bf16/fp16 weights
            if in_dtype is not None:  # DeepSpeed bf16/fp16 casts the module itself
                x, enc = x.to(in_dtype), enc.to(in_dtype)
            if acc.device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            with acc.autocast():
                out = unet(x, t, encoder_hidden_states=enc, class_labels=labels, return_dict=False)[0]
            loss = (out.float()[:, :3] - x[:, :3].float()).pow(2).mean()
            acc.backward(loss)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if acc.device.type == "cuda":
                torch.cuda.synchronize()
            if i:
                times.append(time.perf_counter() - t0)
            losses.append(float(loss.detach()))
        return {"engine": acc.distributed_type.value, "optimizer": opt_name, "steps_run": len(losses),
                "loss": losses, "loss_finite": all(math.isfinite(v) for v in losses), "step_s": times,
                "step_s_median": statistics.median(times) if times else None,
                "max_memory_allocated": torch.cuda.max_memory_allocated() if acc.device.type == "cuda" else None}


if __name__ == "__main__":
    print("DEVICE_CHECK " + json.dumps(main(sys.argv[1])), flush=True)
