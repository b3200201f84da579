"""LR schedules (train.lr_scheduler): the logged LR follows the schedule's formula per optimizer
step under gradient accumulation, and a killed + resumed run continues the same sequence."""
from __future__ import annotations

import csv
import math
import shutil

import pytest
import torch

from cascade.config import ConfigError, load_config
from stages.schedules import SCHEDULES, make_schedule
from tests.test_stage1_training import train

SETS = ("stage1.train.max_steps=4", "stage1.train.checkpoint_every=2", "stage1.train.sample_every=100",
        "stage1.train.prior_preservation=false", "stage1.train.gradient_accumulation_steps=2",
        "stage1.train.lr_scheduler=cosine", "stage1.train.lr_warmup_steps=1", "stage1.train.learning_rate=1e-3",
        "stage1.train.batch_size=1")


def cosine(step: int, warmup: int, total: int, lr: float) -> float:
    """The half-cosine after linear warmup, written out (not diffusers' code)."""
    if step < warmup:
        return lr * step / warmup
    return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def _lrs(run) -> list[float]:
    with open(run / "loss.csv") as f:
        return [float(r["lr"]) for r in csv.DictReader(f)]


def test_cosine_lr_follows_formula_and_resume_continues_it(make_cfg, subject_dir, tmp_path):
    full = train(make_cfg, subject_dir, tmp_path / "full", *SETS)
    # row n holds the LR optimizer step n used (the schedule's value before its n-th step): warmup
    # starts at 0, and the cosine reaches 0 only after the last step
    expected = [cosine(n - 1, 1, 4, 1e-3) for n in range(1, 5)]
    assert _lrs(full) == pytest.approx(expected, rel=1e-9, abs=1e-15)
    assert _lrs(full)[:2] == pytest.approx([0.0, 1e-3]) and _lrs(full)[-1] > 0  # the schedule really acts

    killed = tmp_path / "killed"
    shutil.copytree(full, killed)
    shutil.rmtree(killed / "checkpoints" / "checkpoint-000004")
    shutil.rmtree(killed / "export")
    train(make_cfg, subject_dir, killed, *SETS, extra=["--resume"])
    assert _lrs(killed) == _lrs(full)  # steps 3..4 computed after the resume
    assert "checkpoint-000002 at step 2" in (killed / "log.txt").read_text()


@pytest.mark.parametrize("name", SCHEDULES)
def test_every_schedule_builds_from_config(name):
    cfg = load_config("tiny", [f"stage1.train.lr_scheduler={name}", "stage1.train.lr_warmup_steps=2",
                               "stage1.train.max_steps=10", "stage1.train.lr_num_cycles=2"]).stage1.train
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.learning_rate)
    sched = make_schedule(opt, cfg)
    lrs = []
    for _ in range(10):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    if name == "constant":
        assert lrs == [cfg.learning_rate] * 10
    else:
        assert lrs[0] == 0.0 and lrs[2] == pytest.approx(cfg.learning_rate)  # warmup reached at step 2
    if name in ("linear", "cosine", "polynomial"):
        assert all(a >= b for a, b in zip(lrs[2:], lrs[3:])) and lrs[-1] < 0.5 * cfg.learning_rate
    if name == "cosine_with_restarts":
        assert lrs[6] > lrs[5]  # two cycles over steps 2..10: restarts at 6


def test_bad_schedule_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match="stage2.train.lr_scheduler"):
        load_config("tiny", ["stage2.train.lr_scheduler=onecycle"])
    with pytest.raises(ConfigError, match="lr_warmup_steps"):
        load_config("tiny", ["stage1.train.lr_scheduler=cosine", "stage1.train.lr_warmup_steps=20"])


@pytest.mark.parametrize("preset", ["if-xl", "if-l", "if-m"])
def test_paper_presets_keep_the_trainer_features_off(preset):
    for stage in ("stage1", "stage2"):
        t = getattr(load_config(preset), stage).train
        assert (t.lr_scheduler, t.lr_warmup_steps, t.snr_gamma, t.caption_dropout, t.ema) == \
            ("constant_with_warmup", 0, 0.0, 0.0, False), (preset, stage)
        assert t.optimizer in ("adamw", "adamw8bit") and t.lora_type == "lora" and t.lora_targets == ""
