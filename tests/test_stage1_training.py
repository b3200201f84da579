"""Stage I DreamBooth: the loss falls, the prior batch contributes gradient, exports reload in plain
diffusers with the trained predictions, LoRA exports load whole, resume equals an uninterrupted run."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from cascade.cli.main import main
from stages import data
from stages.losses import DiffusionMath, diffusion_loss, prior_preservation_split
from stages.stage1 import Stage1Task
from tests.conftest import eval_loss

OFF = dict(safety_checker=None, watermarker=None, feature_extractor=None, requires_safety_checker=False)


def train(make_cfg, subject, out: Path, *sets: str, extra=()) -> Path:
    cache = make_cfg().models.cache_dir
    argv = ["train", "stage1", "--subject", str(subject), "--class-noun", "dog", "--output", str(out),
            "--set", f"models.cache_dir={cache}", "--set", "stage1.train.num_class_images=2",
            "--set", "stage1.train.validation_images=1", "--set", "stage1.train.validation_steps=2",
            "--set", "stage1.sample.steps=2", *[a for s in sets for a in ("--set", s)], *extra]
    assert main(argv) == 0
    return out


def _fixed_inputs(unet, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 64, 64, generator=g)
    t = torch.tensor([10, 700])[:n]
    enc = torch.randn(n, 77, 32, generator=g)
    return x, t, enc


def _predict(unet, inputs):
    x, t, enc = inputs
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=enc).sample


def _checkpoint_unet(tiny, run: Path, lora_rank: int = 0):
    """The trained weights as the trainer left them (accelerate's checkpoint), loaded independently."""
    from diffusers import UNet2DConditionModel

    from stages import checkpoint, setup

    unet = UNet2DConditionModel.from_pretrained(tiny / "stage1", subfolder="unet")
    if lora_rank:
        setup.add_lora(unet, lora_rank, 0)
    state = load_file(str(checkpoint.latest_checkpoint(run / "checkpoints") / "model.safetensors"))
    unet.load_state_dict(state)
    return unet.eval()


def test_full_finetune_loss_falls_and_export_reloads(make_cfg, tiny, subject_dir, tmp_path):
    from diffusers import DDPMScheduler, IFPipeline, UNet2DConditionModel

    run = train(make_cfg, subject_dir, tmp_path / "run", "stage1.train.max_steps=12",
                "stage1.train.learning_rate=5e-4", "stage1.train.sample_every=6", "stage1.train.checkpoint_every=6")
    for f in ("config.yaml", "log.txt", "loss.csv", "loss.png", "samples/step-000006.png", "samples/step-000012.png",
              "checkpoints/checkpoint-000012/model.safetensors", "export/cascade.json", "export/unet/config.json",
              "export/scheduler/scheduler_config.json"):
        assert (run / f).is_file(), f
    rows = (run / "loss.csv").read_text().splitlines()
    assert rows[0] == "step,instance_loss,prior_loss,lr" and len(rows) == 13 and rows[-1].split(",")[2] != ""
    meta = json.loads((run / "export" / "cascade.json").read_text())
    assert meta["stage"] == 1 and meta["kind"] == "full" and meta["instance_prompt"] == f"a {meta['identifier']} dog"

    # plain diffusers: the exported UNet in an IFPipeline predicts exactly what training produced
    exported = UNet2DConditionModel.from_pretrained(run / "export" / "unet")
    pipe = IFPipeline.from_pretrained(tiny / "stage1", unet=exported, **OFF)
    trained = _checkpoint_unet(tiny, run)
    inputs = _fixed_inputs(trained)
    assert torch.allclose(_predict(pipe.unet, inputs), _predict(trained, inputs), atol=1e-5)
    sched = DDPMScheduler.from_pretrained(run / "export" / "scheduler")
    assert sched.config.variance_type == "learned_range"  # hybrid loss keeps the stock scheduler valid

    # the loss on a fixed evaluation batch of the subject fell
    base = UNet2DConditionModel.from_pretrained(tiny / "stage1", subfolder="unet").eval()
    subject = data.stack(data.load_folder(subject_dir, 64), 64)
    before, after = eval_loss(base, subject, sched, 123), eval_loss(exported.eval(), subject, sched, 123)
    assert after < 0.9 * before, (before, after)


def test_prior_batch_contributes_gradient(tiny, subject_dir):
    from diffusers import DDPMScheduler, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny / "stage1", subfolder="unet")
    math_ = DiffusionMath(DDPMScheduler.from_pretrained(tiny / "stage1", subfolder="scheduler").alphas_cumprod)
    inst = data.stack(data.load_folder(subject_dir, 64), 64)
    task = Stage1Task(inst, prior=-inst.flip(-1))
    batch = task.batch(2, True, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(batch["x0"].shape, generator=g)
    t = torch.tensor([100, 400, 100, 400])
    xt = math_.q_sample(batch["x0"], noise, t)
    enc = torch.randn(4, 77, 32, generator=g)

    def grad(weight):
        unet.zero_grad()
        out = unet(xt, t, encoder_hidden_states=enc).sample
        per = diffusion_loss(math_, out, batch["x0"], xt, noise, t)
        total, inst_loss, prior_loss = prior_preservation_split(per, 2, weight)
        total.backward()
        return unet.conv_in.weight.grad.clone(), prior_loss.detach()

    g0, _ = grad(0.0)
    g1, prior_loss = grad(1.0)
    g2, _ = grad(2.0)
    assert prior_loss > 0 and (g1 - g0).abs().max() > 1e-6
    assert torch.allclose(g2 - g1, g1 - g0, atol=1e-6)  # gradient is linear in the prior weight


def test_lora_export_loads_whole_with_load_lora_weights(make_cfg, tiny, subject_dir, tmp_path):
    from diffusers import DDPMScheduler, IFPipeline

    run = train(make_cfg, subject_dir, tmp_path / "lora", "stage1.train.max_steps=4", "stage1.train.loss=epsilon",
                "stage1.train.learning_rate=1e-3", extra=["--lora-rank", "4"])
    weights = load_file(str(run / "export" / "pytorch_lora_weights.safetensors"))
    pipe = IFPipeline.from_pretrained(tiny / "stage1", **OFF)
    inputs = _fixed_inputs(pipe.unet)
    base_pred = _predict(pipe.unet, inputs)
    pipe.load_lora_weights(run / "export")
    lora_params = [n for n, _ in pipe.unet.named_parameters() if "lora_" in n]
    assert len(weights) == len(lora_params) == 48  # every adapter tensor loaded (to_q/k/v/out and add_k/v)
    trained = _checkpoint_unet(tiny, run, lora_rank=4)
    loaded_pred = _predict(pipe.unet, inputs)
    assert torch.allclose(loaded_pred, _predict(trained, inputs), atol=1e-5)
    assert (loaded_pred - base_pred).abs().max() > 1e-4  # and the adapter really changes the model
    # epsilon-only training leaves the variance channels untrained: the export samples with fixed_small
    assert DDPMScheduler.from_pretrained(run / "export" / "scheduler").config.variance_type == "fixed_small"


def test_resume_equals_uninterrupted(make_cfg, subject_dir, tmp_path):
    sets = ("stage1.train.max_steps=6", "stage1.train.checkpoint_every=3", "stage1.train.sample_every=100",
            "stage1.train.learning_rate=1e-3")
    full = train(make_cfg, subject_dir, tmp_path / "full", *sets, extra=["--class-dir", str(tmp_path / "cls")])
    # a run killed after its step-3 checkpoint: later state gone, a half-written checkpoint left behind
    killed = tmp_path / "killed"
    shutil.copytree(full, killed)
    shutil.rmtree(killed / "checkpoints" / "checkpoint-000006")
    shutil.rmtree(killed / "export")
    (killed / "checkpoints" / "checkpoint-000006.tmp").mkdir()
    train(make_cfg, subject_dir, killed, *sets, extra=["--resume", "--class-dir", str(tmp_path / "cls")])
    a = load_file(str(full / "export" / "unet" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(killed / "export" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    assert (killed / "loss.csv").read_text() == (full / "loss.csv").read_text()
    log = (killed / "log.txt").read_text()
    assert "resumed from" in log and "checkpoint-000003 at step 3" in log and "stage 1: 3 steps in" in log
