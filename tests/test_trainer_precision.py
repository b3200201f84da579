"""The trainer's precision contract: autocast covers the forward and the loss only (backward and the
optimizer step run outside it, so autocast's low-precision weight copies are freed before backward),
a killed bf16 run with optimizer-in-backward resumes bit-identically, fp16 + in-backward is refused.
bf16 is ~15x slower than fp32 on this CPU, so these run the trainer directly on a 16x16 tiny UNet."""
from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from cascade.config import Train
from stages import trainer
from stages.optimizers import factory

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one mixed-precision setting per process; a test's bf16 must not leak."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def _run(run_dir, resume=False, **train):
    from diffusers import DDPMScheduler

    from cascade.offline.tiny import T5_DIM, build_stage1_unet
    from stages.stage1 import Stage1Task

    torch.manual_seed(0)
    unet = build_stage1_unet(sample_size=16)
    if train.get("weights_dtype") == "bfloat16":
        unet.to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    task = Stage1Task(torch.rand(3, 3, 16, 16, generator=g) * 2 - 1, resolution=16)
    text = torch.randn(1, 8, T5_DIM, generator=g)
    cfg = Train(batch_size=2, validation_images=0, sample_every=100, fused_optimizer=False, **train)
    return trainer.train(task, unet, DDPMScheduler(num_train_timesteps=1000), trainer.Embeddings(text, text), cfg,
                         run_dir, {}, resume=resume)


def test_backward_and_step_run_outside_autocast(tmp_path, monkeypatch, fresh_accelerate_state):
    seen = {"forward": [], "backward": [], "step": []}
    real_loss, real_build = trainer.diffusion_loss, factory.build

    def loss(*a, **kw):
        seen["forward"].append(torch.is_autocast_enabled("cpu"))
        return real_loss(*a, **kw)

    def build(params, *a, **kw):
        params = list(params)
        opt, name = real_build(params, *a, **kw)
        params[0].register_post_accumulate_grad_hook(lambda p: seen["backward"].append(torch.is_autocast_enabled("cpu")))
        opt.register_step_pre_hook(lambda *_: seen["step"].append(torch.is_autocast_enabled("cpu")))
        return opt, name

    monkeypatch.setattr(trainer, "diffusion_loss", loss)
    monkeypatch.setattr(factory, "build", build)
    result = _run(tmp_path / "run", max_steps=2, mixed_precision="bf16")
    assert seen["forward"] == [True, True]  # bf16 autocast really is on for the forward
    assert seen["backward"] == [False, False] and seen["step"] == [False, False]
    assert all(r["instance_loss"] > 0 for r in result.losses)


def test_killed_bf16_in_backward_run_resumes_bit_identically(tmp_path, fresh_accelerate_state):
    sets = dict(max_steps=4, checkpoint_every=2, learning_rate=1e-4, weights_dtype="bfloat16",
                optimizer_in_backward=True, bf16_update="stochastic", max_grad_norm=0.0, optimizer_states="bf16")
    full = _run(tmp_path / "full", **sets).run_dir
    killed = tmp_path / "killed"
    shutil.copytree(full, killed)
    shutil.rmtree(killed / "checkpoints" / "checkpoint-000004")
    shutil.rmtree(killed / "export")
    resumed = _run(killed, resume=True, **sets)
    assert [r["step"] for r in resumed.losses] == [1, 2, 3, 4]
    a = load_file(str(full / "export" / "unet" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(killed / "export" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (killed / "loss.csv").read_text() == (full / "loss.csv").read_text()


def test_fp16_autocast_with_optimizer_in_backward_is_refused(make_cfg):
    from cascade.config import ConfigError
    from stages.errors import InputError

    with pytest.raises(ConfigError, match="optimizer_in_backward.*mixed_precision=fp16"):
        make_cfg("stage1.train.optimizer_in_backward=true", "stage1.train.mixed_precision=fp16")
    with pytest.raises(InputError, match="fp16 mixed precision"):  # auto resolved to fp16 on an older GPU
        factory.build([torch.nn.Parameter(torch.zeros(4))], Train(optimizer_in_backward=True), mixed_precision="fp16")
