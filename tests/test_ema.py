"""EMA of the trained weights (train.ema): the export holds the average (which differs from the raw
weights and equals the EMA state in the checkpoint), cascade.json says so, a killed + resumed run
exports the same average, and the host-memory option averages the same way."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from stages.ema import TrainingEMA, check_engine
from tests.test_stage1_training import train

SETS = ("stage1.train.max_steps=4", "stage1.train.checkpoint_every=2", "stage1.train.sample_every=100",
        "stage1.train.prior_preservation=false", "stage1.train.batch_size=1", "stage1.train.learning_rate=1e-3",
        "stage1.train.ema=true", "stage1.train.ema_decay=0.5", "stage1.train.ema_start_step=1")


def _export(run):
    return load_file(str(run / "export" / "unet" / "diffusion_pytorch_model.safetensors"))


def test_export_takes_the_ema_weights_and_resume_keeps_them(make_cfg, tiny, subject_dir, tmp_path, one_thread):
    from diffusers import UNet2DConditionModel

    full = train(make_cfg, subject_dir, tmp_path / "full", *SETS)
    ckpt = full / "checkpoints" / "checkpoint-000004"
    raw = load_file(str(ckpt / "model.safetensors"))  # the last step's weights
    shadow = load_file(str(ckpt / "ema.safetensors"))  # the EMA: tensors and JSON, nothing pickled
    state = {**json.loads((ckpt / "ema.json").read_text()), "shadow_params": [shadow[k] for k in sorted(shadow)]}
    exported = _export(full)
    # the EMA's shadow list is in the trainable parameters' order
    names = [n for n, _ in UNet2DConditionModel.from_pretrained(tiny / "stage1", subfolder="unet").named_parameters()]
    assert set(names) == set(raw)
    assert len(names) == len(state["shadow_params"]) and state["optimization_step"] == 4
    assert max((exported[k] - raw[k]).abs().max().item() for k in names) > 1e-5  # not the raw weights
    for k, s in zip(names, state["shadow_params"]):
        assert torch.equal(exported[k], s), k  # exactly the average
    meta = json.loads((full / "export" / "cascade.json").read_text())
    assert meta["weights"] == "ema" and meta["ema"]["decay"] == 0.5 and meta["ema"]["start_step"] == 1
    card = (full / "export" / "README.md").read_text()  # every export carries its model card
    assert card.startswith("---\n") and "exponential moving average" in card and "| ema_decay | 0.5 |" in card

    killed = tmp_path / "killed"
    shutil.copytree(full, killed)
    shutil.rmtree(killed / "checkpoints" / "checkpoint-000004")
    shutil.rmtree(killed / "export")
    train(make_cfg, subject_dir, killed, *SETS, extra=["--resume"])
    again = _export(killed)
    assert max((again[k] - exported[k]).abs().max().item() for k in names) < 1e-6


def test_average_follows_the_decay_and_start_step_on_device_and_host():
    p = torch.nn.Parameter(torch.zeros(3))
    on_device, on_host = TrainingEMA([p], decay=0.5, start_step=2), TrainingEMA([p], decay=0.5, on_cpu=True,
                                                                                start_step=2)
    expected = torch.zeros(3)
    for n, value in enumerate([1.0, 2.0, 3.0, 4.0, 5.0], start=1):
        with torch.no_grad():
            p.fill_(value)
        on_device.step()
        on_host.step()
        k = n - 2 - 1  # EMAModel: copies the weights until start_step, then decay min(0.5, (1+k)/(10+k))
        decay = 0.0 if k <= 0 else min(0.5, (1 + k) / (10 + k))
        expected = decay * expected + (1 - decay) * value
        assert torch.allclose(on_device.shadow[0], expected) and torch.allclose(on_host.shadow[0], expected), n
    assert on_host.shadow[0].device.type == "cpu" and on_host.shadow[0].dtype == torch.float32
    assert on_host._sources()[0] is not p  # host copies, averaged (not copied: they keep requires_grad)
    on_device.copy_to_model()
    assert torch.allclose(p.detach(), expected) and expected[0] != 5.0


def test_bf16_weights_keep_an_fp32_average():
    p = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    ema = TrainingEMA([p], decay=0.999)
    assert ema.shadow[0].dtype == torch.float32


def test_ema_refused_under_sharded_engines(monkeypatch):
    from cascade.config import ConfigError, load_config
    from stages.errors import InputError

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # the config check refuses it (cascade/compat.py's table)
    with pytest.raises(ConfigError, match="train.ema=true and engine fsdp2: the EMA averages whole weights"):
        load_config("tiny", ["stage1.train.ema=true"])
    with pytest.raises(InputError, match="train.ema works in one process or under DDP, not under fsdp"):
        check_engine("fsdp")  # and the stage, used without cascade's config check


@pytest.mark.parametrize("on_cpu", [False, True])
def test_memory_planner_counts_the_ema_copy(tmp_path, monkeypatch, on_cpu):
    """`cascade bench --estimate-memory` with train.ema: the fp32 copy of the trainable parameters is
    added to every phase from the first training step on, or with ema_on_cpu kept in host memory,
    where each step's fp32 host copy of the weights doubles it (host peak 2 x 4 bytes a trainable
    parameter, 4 bytes a parameter copied per step) and the device converts the largest parameter
    to fp32 for its copy. The traces are replaced by fixed numbers: the planner's own accuracy is
    tests/test_memory.py's job."""
    from cascade.cli.main import main
    from cascade.perf import command_plan, planner

    step = {"params_total": 1000, "params_trainable": 250, "largest_trainable": 50, "label": "x",
            "bytes": {"params": 4000, "grads": 1000, "optimizer": 2000, "activations_at_peak": 500, "peak": 9000}}
    phases = {"t5_encode": 300, "class_images": 400, "train_step": 9000, "validation_own": 7000,
              "validation_partner": 7500, "export": 6000}
    monkeypatch.setattr(planner, "trace_step", lambda plan: step)
    monkeypatch.setattr(command_plan, "command_phases", lambda *a, **k: dict(phases))

    def plan(*sets):
        out = tmp_path / f"plan{len(sets)}.json"
        argv = ["bench", "--estimate-memory", "--config", "tiny", "--batch", "1", "--output", str(out)]
        assert main(argv + [a for s in sets for a in ("--set", s)]) == 0
        return json.loads(out.read_text())

    off = plan()
    on = plan("stage1.train.ema=true", f"stage1.train.ema_on_cpu={str(on_cpu).lower()}")
    assert off["phases"] == phases and off["host_ema"] == {}
    for phase, value in phases.items():
        grows = phase in ("train_step", "validation_own", "validation_partner", "export")
        assert on["phases"][phase] == value + ((50 * 4 if phase == "train_step" else 0) if on_cpu else
                                               (250 * 4 if grows else 0)), phase
    if on_cpu:
        assert on["host_ema"] == {"ema_host_peak": 2 * 250 * 4, "ema_host_shadow": 250 * 4,
                                  "ema_traffic_per_step": 250 * 4}
        assert on["command_peak"] == 9200 and "EMA in host RAM" in on["markdown"]
    else:
        assert on["host_ema"] == {} and on["command_peak"] == 10000 and "EMA copy" in on["markdown"]
