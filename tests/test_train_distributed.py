"""Two CPU processes (torchrun, gloo): stage I trains with DDP, ranks stay in sync, one export; the
LR schedule (cosine with warmup), the class images and the process-group timeout match what one
process would have; the EMA of the weights is the same on both ranks and is what is exported."""
from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from tests.conftest import free_port

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_stage1.py"


def one_process_lrs(lr: float, warmup: int, steps: int, name: str = "constant_with_warmup") -> list[float]:
    """What the trainer's schedule gives in a single process: one step per optimizer step."""
    from diffusers.optimization import get_scheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=steps)
    out = []
    for _ in range(steps):
        out.append(sched.get_last_lr()[0])  # the rate this optimizer step uses
        opt.step()
        sched.step()
    return out


def test_two_process_training(make_cfg, subject_dir, tmp_path):
    cache = make_cfg().models.cache_dir
    out = tmp_path / "ddp"
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [str(torchrun), "--nproc_per_node", "2", "--master_port", str(free_port()), str(SCRIPT), "--subject", str(subject_dir),
         "--class-noun", "dog", "--output", str(out), "--max-steps", "4", "--set", f"models.cache_dir={cache}",
         "--set", "stage1.sample.steps=2",
         "--set", "stage1.train.num_class_images=2", "--set", "stage1.train.validation_images=1",
         "--set", "stage1.train.validation_steps=2", "--set", "stage1.train.learning_rate=1e-3",
         "--set", "stage1.train.lr_warmup_steps=2", "--set", "stage1.train.lr_scheduler=cosine",
         "--set", "stage1.train.ema=true", "--set", "distributed_timeout_minutes=77"],
        env=env, capture_output=True, text=True, timeout=900)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-4000:]
    assert "2 process(es)" in text
    sums = dict(re.findall(r"rank (\d)/2 final weights checksum (\S+)", text))
    assert sorted(sums) == ["0", "1"] and sums["0"] == sums["1"], sums
    # saved once: one export, one set of checkpoints, one loss file, written by the main process
    assert (out / "export" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["checkpoint-000004"]
    rows = list(csv.DictReader(open(out / "loss.csv")))
    assert len(rows) == 4
    assert text.count("export") >= 1 and "Traceback" not in text
    assert (out / ".cascade-run").is_file() and not (out / ".cascade-lock").exists()  # main process locked, released
    # the schedule counts optimizer steps, as on one process (accelerate would step it twice per call)
    assert np.allclose([float(r["lr"]) for r in rows], one_process_lrs(1e-3, 2, 4, "cosine"), rtol=1e-9, atol=0)
    assert float(rows[0]["lr"]) == 0.0 and float(rows[-1]["lr"]) < 1e-3  # warmup from 0, the cosine decays
    # the EMA (train.ema) is averaged identically on both ranks (equal checksums above) and exported
    assert '"weights": "ema"' in (out / "export" / "cascade.json").read_text()
    # the configured timeout is the live process group's
    assert "process-group timeout 1:17:00" in text
    # class images were split between the ranks (file equality: test_engines_distributed.py)
    assert text.count("0 of 2 class images present; generating 1 here") == 2
    assert sorted(p.name for p in (out / "class_images").glob("*.png")) == ["class-000000.png", "class-000001.png"]
