"""Training that diverges (issue 9 item 4): stop at the first non-finite loss with one error line and
exit 1, keep the last good checkpoint, write no export; with two processes both stop together."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from cascade.cli.main import main
from tests.conftest import free_port

HELPER = Path(__file__).resolve().parent / "helpers" / "diverge_on_one_rank.py"
ARGS = ["--class-noun", "dog", "--set", "stage1.train.prior_preservation=false",
        "--set", "stage1.train.validation_images=0", "--set", "stage1.train.checkpoint_every=1"]


def test_nan_loss_stops_training_keeps_last_good_checkpoint(make_cfg, write_subject, tmp_path, capsys):
    subject = write_subject(tmp_path / "photos", 3, 80)
    out = tmp_path / "run"
    code = main(["train", "stage1", "--subject", str(subject), "--output", str(out), *ARGS,
                 "--set", f"models.cache_dir={make_cfg().models.cache_dir}", "--max-steps", "5",
                 "--set", "stage1.train.learning_rate=1e8"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert code == 1 and len(lines) == 1 and "Traceback" not in err, err
    assert "diverged" in lines[0] and "not finite at step 2" in lines[0] and "checkpoint-000001" in lines[0]
    assert not (out / "export").exists() and not (out / "export.tmp").exists()
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["checkpoint-000001"]  # the last good state, nothing written after the NaN
    weights = load_file(str(out / "checkpoints" / "checkpoint-000001" / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert not (out / ".cascade-lock").exists()


def test_nan_on_one_rank_stops_both_ranks(make_cfg, write_subject, tmp_path):
    subject = write_subject(tmp_path / "photos", 3, 80)
    out = tmp_path / "ddp"
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "DIVERGE_LOG": str(tmp_path / "stderr"),
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run(
        [str(torchrun), "--nproc_per_node", "2", "--master_port", str(free_port()), str(HELPER), "--subject", str(subject),
         "--output", str(out), "--max-steps", "4", *ARGS, "--set", f"models.cache_dir={make_cfg().models.cache_dir}"],
        env=env, capture_output=True, text=True, timeout=600)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    errors = [line for r in (0, 1) for line in (tmp_path / f"stderr.{r}").read_text().splitlines()
              if "cascade train stage1: error:" in line]  # each rank's own stderr
    assert len(errors) == 2 and all("not finite at step 2" in e and "nan" in e for e in errors), text[-3000:]
    # torchrun itself reports the failed children with a traceback of its own; none from our code
    assert "stages/" not in text and "cascade/" not in text.replace("cascade train", "")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-000001"]
    assert not (out / "export").exists() and not (out / ".cascade-lock").exists()
