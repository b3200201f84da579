"""Two CPU processes (torchrun, gloo): stage I trains with DDP, ranks stay in sync, one export."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_stage1.py"


def test_two_process_training(make_cfg, subject_dir, tmp_path):
    cache = make_cfg().models.cache_dir
    out = tmp_path / "ddp"
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [str(torchrun), "--nproc_per_node", "2", "--master_port", "29531", str(SCRIPT), "--subject", str(subject_dir),
         "--class-noun", "dog", "--output", str(out), "--max-steps", "4", "--set", f"models.cache_dir={cache}",
         "--set", "stage1.train.num_class_images=2", "--set", "stage1.train.validation_images=1",
         "--set", "stage1.train.validation_steps=2", "--set", "stage1.sample.steps=2",
         "--set", "stage1.train.learning_rate=1e-3"],
        env=env, capture_output=True, text=True, timeout=400)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-4000:]
    assert "2 process(es)" in text
    sums = dict(re.findall(r"rank (\d)/2 final weights checksum (\S+)", text))
    assert sorted(sums) == ["0", "1"] and sums["0"] == sums["1"], sums
    # saved once: one export, one set of checkpoints, one loss file, written by the main process
    assert (out / "export" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["checkpoint-000004"]
    assert len((out / "loss.csv").read_text().splitlines()) == 5
    assert text.count("export") >= 1 and "Traceback" not in text
    assert (out / ".cascade-run").is_file() and not (out / ".cascade-lock").exists()  # main process locked, released
