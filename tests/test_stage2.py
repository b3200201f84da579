"""Stage II fine-tuning on real (64 -> 256) pairs: the loss falls, the fine-tuned SR model reconstructs
its training pairs better, exports load in plain diffusers, and bad inputs are refused clearly."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from cascade.cli.main import main
from stages import components, data, noise_aug, sampling, trainer
from stages.losses import DiffusionMath, diffusion_loss
from stages.stage2 import Stage2Task

OFF = dict(safety_checker=None, watermarker=None, feature_extractor=None, requires_safety_checker=False)
# quick settings: batch 1, one validation image with a 2-step sampler, checkpoints only at the end
FAST = ["stage2.train.batch_size=1", "stage2.train.validation_images=1", "stage2.train.validation_steps=2",
        "stage2.train.sample_every=1000", "stage2.train.checkpoint_every=1000"]
FULL_STEPS = 30
FULL_LR = 1e-3  # tiny random model: 1e-3 gives +1.5..2.5 dB at t=50 after 30 steps across seeds and subjects


def _argv(cache_dir, subject, out, *extra, sets=()):
    argv = ["train", "stage2", "--subject", str(subject), "--class-noun", "dog", "--output", str(out), *extra,
            "--set", f"models.cache_dir={cache_dir}"]
    for s in (*FAST, *sets):
        argv += ["--set", s]
    return argv


def _train_and_capture(argv):
    """Run `cascade train stage2 ...` and keep what the trainer received (task, the UNet it trained)."""
    seen = {}
    original = trainer.train

    def spy(task, unet, scheduler, embeds, *args, **kwargs):
        seen.update(task=task, unet=unet, scheduler=scheduler, embeds=embeds)
        return original(task, unet, scheduler, embeds, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer, "train", spy)
        code = main(argv)
    assert code == 0
    seen["unet"].eval()
    return seen


@pytest.fixture(scope="module")
def subject(tmp_path_factory):
    from tests.conftest import SHARED_DATA, _write_subject

    dog = SHARED_DATA / "dog"
    return dog if dog.is_dir() else _write_subject(tmp_path_factory.mktemp("subject"), 4, 320)


@pytest.fixture(scope="module")
def full_run(cache_dir, subject, tmp_path_factory):
    out = tmp_path_factory.mktemp("stage2-full") / "run"
    seen = _train_and_capture(_argv(cache_dir, subject, out, "--noise-aug", "0:5", "--sample-noise-level", "3",
                                     "--max-steps", str(FULL_STEPS),
                                     sets=[f"stage2.train.learning_rate={FULL_LR}"]))
    return {**seen, "export": out / "export", "run": out}


def _base_unet(tiny):
    return components.load_unet(str(tiny / "stage2")).eval()


@torch.no_grad()
def _evaluate(unet, run, t_value: int, noise_level: int = 0):
    """Hybrid loss and PSNR of the one-step x0 estimate on the subject's own 256px images (fixed draws)."""
    task, embeds = run["task"], run["embeds"]
    x0 = data.downsample(task.instance, 256)
    n = x0.shape[0]
    dm = DiffusionMath(run["scheduler"].alphas_cumprod)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(7))
    t = torch.full((n,), t_value)
    xt = dm.q_sample(x0, noise, t)
    levels = torch.full((n,), noise_level)
    cond = noise_aug.noised_condition(data.downsample(x0, 64), 256, levels, task.noising_scheduler,
                                      noise=torch.randn(x0.shape, generator=torch.Generator().manual_seed(8)))
    out = unet(noise_aug.model_input(xt, cond), t, encoder_hidden_states=embeds.instance.expand(n, -1, -1),
               class_labels=levels, return_dict=False)[0]
    ac = dm.alphas_cumprod[t_value]
    x0_hat = (xt - (1 - ac).sqrt() * out[:, :3]) / ac.sqrt()
    mse = (x0_hat.clamp(-1, 1) - x0).pow(2).mean(dim=(1, 2, 3))
    return diffusion_loss(dm, out, x0, xt, noise, t), 10 * torch.log10(4.0 / mse)  # PSNR for range [-1, 1]


def _fixed_input(seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(sample=torch.randn(1, 6, 256, 256, generator=g), timestep=torch.tensor([137]),
                encoder_hidden_states=torch.randn(1, 77, 32, generator=g), class_labels=torch.tensor([3]))


@torch.no_grad()
def _predict(unet, inputs):
    return unet(**inputs, return_dict=False)[0]


def test_training_loss_decreases_on_fixed_batch(full_run, tiny):
    base = _base_unet(tiny)
    before = torch.stack([_evaluate(base, full_run, t)[0] for t in (50, 200, 500)])
    after = torch.stack([_evaluate(full_run["unet"], full_run, t)[0] for t in (50, 200, 500)])
    assert after.mean() < 0.8 * before.mean(), (before.mean(), after.mean())
    assert (after.mean(dim=1) < before.mean(dim=1)).all()  # at every evaluated timestep
    rows = (full_run["run"] / "loss.csv").read_text().splitlines()
    assert len(rows) == FULL_STEPS + 1  # header + one row per step


def test_finetuned_sr_reconstructs_training_pairs_better(full_run, tiny):
    """PSNR vs the 256px target of x0_hat = (x_t - sqrt(1-a) eps) / sqrt(a) at t=50, noise level 0."""
    _, psnr_before = _evaluate(_base_unet(tiny), full_run, 50)
    _, psnr_after = _evaluate(full_run["unet"], full_run, 50)
    gain = psnr_after - psnr_before
    assert (gain > 0.5).all(), gain  # every training pair improves (measured: >= 1.5 dB)
    assert gain.mean() > 1.0, gain


def test_full_export_loads_in_plain_pipeline(full_run, tiny):
    from diffusers import IFSuperResolutionPipeline, UNet2DConditionModel

    export = full_run["export"]
    pipe = IFSuperResolutionPipeline.from_pretrained(
        tiny / "stage2", unet=UNet2DConditionModel.from_pretrained(export / "unet"), **OFF)
    pipe.set_progress_bar_config(disable=True)
    inputs = _fixed_input()
    trained = _predict(full_run["unet"], inputs)
    assert (_predict(pipe.unet, inputs) - trained).abs().max() < 1e-5
    assert (_predict(_base_unet(tiny), inputs) - trained).abs().max() > 1e-2  # the export is not the base model
    # the whole pipeline with the export == our sampler with the in-memory trained UNet
    emb = full_run["embeds"]
    low = data.downsample(data.downsample(full_run["task"].instance[:1], 256), 64)
    ref = pipe(image=low, prompt_embeds=emb.instance, negative_prompt_embeds=emb.negative, noise_level=3,
               num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt").images
    ours = sampling.sample(full_run["unet"], pipe.scheduler, emb.instance, emb.negative, 2, 4.0,
                           torch.Generator().manual_seed(0), 256, lowres=low, noise_level=3,
                           noising_scheduler=pipe.image_noising_scheduler)
    assert (ref - ours).abs().max() < 1e-5
    meta = json.loads((export / "cascade.json").read_text())
    assert meta["noise_aug"] == [0, 5] and meta["sample_noise_level"] == 3
    assert meta["stage"] == 2 and meta["kind"] == "full" and meta["loss"] == "hybrid"
    assert meta["steps"] == FULL_STEPS and not meta["base"].startswith("/")  # no local path (issue 27)
    assert components.describe_source(str(export)).base == str((tiny / "stage2").resolve())
    # hybrid loss keeps the learned variance: the exported scheduler is still IF's learned_range one
    sched = json.loads((export / "scheduler" / "scheduler_config.json").read_text())
    assert sched["variance_type"] == "learned_range"
    assert components.describe_source(str(export)).kind == "full"


def test_trained_levels_and_sample_level_reach_the_task(full_run):
    task = full_run["task"]
    assert (task.noise_min, task.noise_max, task.sample_noise_level) == (0, 5, 3)
    levels = task.batch(1, False, torch.Generator().manual_seed(0))["noise_level"]
    assert 0 <= levels.item() <= 5


def test_lora_export_loads_with_load_lora_weights(cache_dir, subject, tiny, tmp_path):
    from diffusers import IFSuperResolutionPipeline

    out = tmp_path / "lora"
    seen = _train_and_capture(_argv(cache_dir, subject, out, "--lora-rank", "4", "--max-steps", "3",
                                    sets=["stage2.train.learning_rate=1e-2"]))
    meta = json.loads((out / "export" / "cascade.json").read_text())
    assert meta["kind"] == "lora" and meta["lora_rank"] == 4 and meta["noise_aug"] == [0, 0]
    assert meta["sample_noise_level"] == 0  # default: the top of the trained range (0, as the paper)
    pipe = IFSuperResolutionPipeline.from_pretrained(tiny / "stage2", **OFF)
    inputs = _fixed_input(1)
    base = _predict(pipe.unet, inputs)
    pipe.load_lora_weights(out / "export")
    trained = _predict(seen["unet"], inputs)
    assert (base - trained).abs().max() > 1e-3  # the adapter changes predictions, so matching means loading it
    assert (_predict(pipe.unet, inputs) - trained).abs().max() < 1e-5
    # our own loader (base + adapter) agrees too
    assert (_predict(components.load_unet(str(out / "export")).eval(), inputs) - trained).abs().max() < 1e-5


# ---- bad inputs: exit code 2 and a one-line message naming the fault --------------------------------------


def _write(folder, sizes):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    return folder


def test_small_images_refused_unless_upscale_allowed(cache_dir, tmp_path, capsys, caplog):
    subject = _write(tmp_path / "small", [(200, 200), (300, 300)])
    out = tmp_path / "o"
    code = main(_argv(cache_dir, subject, out, "--max-steps", "1"))
    err = capsys.readouterr().err
    assert code == 2
    assert "cascade train stage2: error:" in err and "00.png is 200x200" in err and "256px" in err and "allow_upscale" in err
    assert not out.exists()  # refused before anything started
    caplog.set_level(logging.INFO)
    code = main(_argv(cache_dir, subject, out, "--max-steps", "1", sets=["stage2.train.allow_upscale=true"]))
    assert code == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("00.png is 200px on its short side; upscaling to 256px" in m for m in warnings), warnings
    assert (out / "export" / "unet").is_dir()


def test_non_square_images_are_centre_cropped(cache_dir, tmp_path, caplog):
    subject = _write(tmp_path / "wide", [(400, 300), (300, 300)])
    caplog.set_level(logging.INFO)
    code = main(_argv(cache_dir, subject, tmp_path / "o", "--max-steps", "1"))
    assert code == 0
    logged = [r.getMessage() for r in caplog.records]
    assert any("00.png is 400x300: centre-cropped to 300x300" in m for m in logged), logged
    # the training tensor is the centre square, resized
    img = Image.open(subject / "00.png")
    assert torch.equal(data.to_tensor(img, 256), data.to_tensor(img.crop((50, 0, 350, 300)), 256))


def test_stage1_model_given_as_stage2(cache_dir, subject, tiny, tmp_path, capsys):
    out = tmp_path / "o"
    code = main(_argv(cache_dir, subject, out, "--model", str(tiny / "stage1")))
    err = capsys.readouterr().err
    assert code == 2
    assert "holds a stage 1 UNet (in_channels=3), but stage 2 is expected" in err and "models.stage2" in err
    assert not out.exists()
    with pytest.raises(components.StageMismatchError):
        components.check_stage(str(tiny / "stage1"), 2, "models.stage2")


@pytest.mark.parametrize("argv, key, detail", [
    (["--noise-aug", "0:1200"], "stage2.train.noise_aug", "0..1200"),
    (["--noise-aug", "30:10"], "stage2.train.noise_aug", "30..10"),
    (["--noise-aug", "x:5"], "--noise-aug", "'x:5'"),  # not integers: named by the flag typed
    (["--sample-noise-level", "1000"], "--sample-noise-level", "0..999"),  # checked as the flag is parsed
])
def test_bad_noise_settings_name_the_key(cache_dir, subject, tmp_path, capsys, argv, key, detail):
    code = main(_argv(cache_dir, subject, tmp_path / "o", *argv))
    err = capsys.readouterr().err
    assert code == 2 and key in err and detail in err, err
    assert not (tmp_path / "o").exists()


# ---- random crops ---------------------------------------------------------------------------------------


def _coordinate_images(n=3, size=320):
    """Pixels that encode where they are: channel 0 = row, 1 = column, 2 = image index."""
    rows = torch.arange(size).view(1, size, 1).expand(1, size, size) / size
    cols = torch.arange(size).view(1, 1, size).expand(1, size, size) / size
    return torch.stack([torch.cat([rows, cols, torch.full((1, size, size), i / n)]) for i in range(n)]) * 2 - 1


def test_random_crop_condition_comes_from_the_same_crop(tiny):
    from diffusers import DDPMScheduler

    noising = DDPMScheduler.from_pretrained(tiny / "stage2", subfolder="image_noising_scheduler")
    images = _coordinate_images()
    task = Stage2Task(images, noising, 0, 0, random_crop=True, resolution=256, lowres=64)
    offsets = set()
    for seed in range(6):
        batch = task.batch(2, False, torch.Generator().manual_seed(seed))
        x0, low = batch["x0"], batch["lowres"]
        assert x0.shape == (2, 3, 256, 256) and low.shape == (2, 3, 64, 64)
        assert torch.equal(low, data.downsample(x0, 64))
        for crop, small in zip(x0, low):
            top = round(((crop[0, 0, 0].item() + 1) / 2) * 320)
            left = round(((crop[1, 0, 0].item() + 1) / 2) * 320)
            idx = round(((crop[2, 0, 0].item() + 1) / 2) * 3)
            assert torch.equal(crop, images[idx, :, top:top + 256, left:left + 256])
            # not the low-res view of the whole photo
            assert (small - data.downsample(images[idx:idx + 1], 64)[0]).abs().max() > 0.05
            offsets.add((top, left))
        # the UNet sees the condition built from this batch's low-res crop
        inp, labels = task.model_input(torch.zeros_like(x0), batch, torch.Generator().manual_seed(100))
        cond = noise_aug.noised_condition(low, 256, batch["noise_level"], noising,
                                          generator=torch.Generator().manual_seed(100))
        assert torch.equal(inp[:, 3:], cond) and torch.equal(labels, batch["noise_level"])
    assert len(offsets) > 6  # the crops really move


def test_random_crop_setting_keeps_larger_source(cache_dir, subject, tmp_path):
    seen = _train_and_capture(_argv(cache_dir, subject, tmp_path / "o", "--max-steps", "1",
                                    sets=["stage2.train.random_crop=true", "stage2.train.crop_source_size=288",
                                          "stage2.train.validation_images=0"]))
    task = seen["task"]
    assert task.random_crop and task.instance.shape[-1] == 288
    batch = task.batch(1, False, torch.Generator().manual_seed(0))
    assert batch["x0"].shape[-1] == 256 and torch.equal(batch["lowres"], data.downsample(batch["x0"], 64))
