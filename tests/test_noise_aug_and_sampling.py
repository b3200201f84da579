"""Stage II conditioning (stages/noise_aug.py) and our sampler (stages/sampling.py) against the diffusers
IF pipelines: same seed, same UNet inputs, same images."""
from __future__ import annotations

import pytest
import torch

from stages import data, noise_aug, sampling
from stages.losses import DiffusionMath, diffusion_loss
from stages.stage2 import Stage2Task

OFF = dict(safety_checker=None, watermarker=None, feature_extractor=None, requires_safety_checker=False)
T5_DIM = 32  # cascade.offline.tiny.T5_DIM


@pytest.fixture(scope="module")
def sr_pipe(tiny):
    from diffusers import IFSuperResolutionPipeline

    pipe = IFSuperResolutionPipeline.from_pretrained(tiny / "stage2", **OFF)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def base_pipe(tiny):
    from diffusers import IFPipeline

    pipe = IFPipeline.from_pretrained(tiny / "stage1", **OFF)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def text_embeds(tiny, cache_dir):
    from cascade.text import TextEncoder

    prompts = ["a photo of a dog", "a red toy on the beach", ""]
    return TextEncoder(str(tiny / "stage1"), cache_dir).encode(prompts)


def _lowres(batch=1, seed=0):
    """A smooth-ish 64px image in [-1, 1] (random, but with structure for bilinear upsampling to show)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, 8, 8, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(coarse, (64, 64), mode="bicubic", align_corners=False).clamp(-1, 1)


def _capture_unet_calls(unet):
    calls = []

    def hook(module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        calls.append({"sample": sample.clone(), "timestep": timestep, "class_labels": kwargs.get("class_labels"),
                      "encoder_hidden_states": kwargs.get("encoder_hidden_states")})

    return calls, unet.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("noise_level", [0, 100, 500])
def test_condition_equals_pipeline_unet_input(sr_pipe, noise_level):
    g = torch.Generator().manual_seed(11)
    emb, neg = torch.randn(1, 77, T5_DIM, generator=g), torch.randn(1, 77, T5_DIM, generator=g)
    low = _lowres()
    calls, handle = _capture_unet_calls(sr_pipe.unet)
    try:
        sr_pipe(image=low, prompt_embeds=emb, negative_prompt_embeds=neg, noise_level=noise_level,
                num_inference_steps=1, guidance_scale=4.0, generator=torch.Generator().manual_seed(5),
                output_type="pt")
    finally:
        handle.remove()
    assert len(calls) == 1
    sample, labels = calls[0]["sample"], calls[0]["class_labels"]
    # the pipeline's draws: initial x_T first, then the condition's noise
    gen = torch.Generator().manual_seed(5)
    x_T = torch.randn(1, 3, 256, 256, generator=gen)
    cond_noise = torch.randn(1, 3, 256, 256, generator=gen)
    ours = noise_aug.noised_condition(low, 256, torch.tensor([noise_level]), sr_pipe.image_noising_scheduler,
                                      noise=cond_noise)
    assert sample.shape == (2, 6, 256, 256)  # classifier-free guidance: [uncond, cond]
    assert torch.allclose(sample[:, 3:], ours.expand(2, -1, -1, -1), atol=1e-6)
    assert torch.equal(labels.cpu(), torch.tensor([noise_level, noise_level]))
    assert torch.allclose(sample[:, :3], x_T.expand(2, -1, -1, -1) * sr_pipe.scheduler.init_noise_sigma)
    assert torch.equal(noise_aug.model_input(x_T, ours), sample[1:])
    # the generator path draws the same noise in the same order
    gen = torch.Generator().manual_seed(5)
    torch.randn(1, 3, 256, 256, generator=gen)
    drawn = noise_aug.noised_condition(low, 256, torch.tensor([noise_level]), sr_pipe.image_noising_scheduler,
                                       generator=gen)
    assert torch.allclose(drawn, ours, atol=0)


def test_upsample_is_bilinear_align_corners():
    low = _lowres(seed=3)
    up = noise_aug.upsample(low, 256)
    for corner in ((0, 0), (0, -1), (-1, 0), (-1, -1)):  # align_corners keeps the corner pixels
        assert torch.allclose(up[..., corner[0], corner[1]], low[..., corner[0], corner[1]], atol=1e-6)
    # 64 -> 256 with align_corners: output pixel 85 sits exactly on input pixel 85 * 63 / 255 = 21
    assert torch.allclose(up[..., 85, 85], low[..., 21, 21], atol=1e-6)
    assert not torch.allclose(up, torch.nn.functional.interpolate(low, (256, 256), mode="bilinear",
                                                                  align_corners=False), atol=1e-3)


def test_noise_std_per_level_matches_design_table(sr_pipe):
    """docs/design.md section 2: the std of the augmentation noise at IF's integer levels."""
    table = {0: 0.006, 1: 0.009, 5: 0.018, 10: 0.027, 20: 0.043, 50: 0.091, 100: 0.169, 250: 0.393, 500: 0.713}
    zeros = torch.zeros(1, 3, 64, 64)
    noise = torch.ones(1, 3, 256, 256)
    for level, std in table.items():
        cond = noise_aug.noised_condition(zeros, 256, torch.tensor([level]), sr_pipe.image_noising_scheduler,
                                          noise=noise)
        assert cond.std() < 1e-6 and cond.mean().item() == pytest.approx(std, abs=1e-3), level
    # and the signal shrinks as sqrt(alpha_bar): at level 500 the image keeps ~70% of its amplitude
    low = _lowres()
    cond = noise_aug.noised_condition(low, 256, torch.tensor([500]), sr_pipe.image_noising_scheduler,
                                      noise=torch.zeros(1, 3, 256, 256))
    ratio = (cond / noise_aug.upsample(low, 256)).median().item()
    assert ratio == pytest.approx((1 - 0.713 ** 2) ** 0.5, abs=2e-3)


def test_sample_noise_levels_uniform_inclusive_and_validated():
    levels = noise_aug.sample_noise_levels(4000, 3, 7, torch.Generator().manual_seed(0))
    assert levels.dtype == torch.long and sorted(levels.unique().tolist()) == [3, 4, 5, 6, 7]
    counts = torch.bincount(levels)[3:]
    assert counts.min() > 700 and counts.max() < 900  # ~800 each
    assert noise_aug.sample_noise_levels(5, 0, 0, torch.Generator()).tolist() == [0] * 5
    assert torch.equal(noise_aug.sample_noise_levels(9, 0, 999, torch.Generator().manual_seed(1)),
                       noise_aug.sample_noise_levels(9, 0, 999, torch.Generator().manual_seed(1)))
    for lo, hi in ((30, 10), (0, 1200), (-1, 5)):
        with pytest.raises(ValueError, match="0 <= low <= high <= 999"):
            noise_aug.sample_noise_levels(2, lo, hi, torch.Generator())


def test_stage2_sample_equals_pipeline(sr_pipe, text_embeds):
    """Two images with per-image generators, guidance 4, 2 steps: our sampler == the pipeline (1e-5)."""
    prompts = ["a photo of a dog", "a red toy on the beach"]
    emb = torch.cat([text_embeds[p] for p in prompts])
    neg = text_embeds[""].expand(2, -1, -1)
    low = _lowres(2, seed=4)
    ref = sr_pipe(image=low, prompt_embeds=emb, negative_prompt_embeds=neg, noise_level=250, num_inference_steps=2,
                  guidance_scale=4.0, generator=[torch.Generator().manual_seed(s) for s in (1, 2)],
                  output_type="pt").images
    ours = sampling.sample(sr_pipe.unet, sr_pipe.scheduler, emb, text_embeds[""], 2, 4.0,
                           [torch.Generator().manual_seed(s) for s in (1, 2)], 256, lowres=low, noise_level=250,
                           noising_scheduler=sr_pipe.image_noising_scheduler)
    assert ours.shape == ref.shape == (2, 3, 256, 256)
    assert (ours - ref).abs().max() < 1e-5
    assert (ours[0] - ours[1]).abs().max() > 0.1  # two different images, not a broadcast
    # one generator for the batch, no guidance (the single-pass path)
    ref1 = sr_pipe(image=low[:1], prompt_embeds=emb[:1], noise_level=20, num_inference_steps=1, guidance_scale=1.0,
                   generator=torch.Generator().manual_seed(3), output_type="pt").images
    ours1 = sampling.sample(sr_pipe.unet, sr_pipe.scheduler, emb[:1], None, 1, 1.0, torch.Generator().manual_seed(3),
                            256, lowres=low[:1], noise_level=20, noising_scheduler=sr_pipe.image_noising_scheduler)
    assert (ours1 - ref1).abs().max() < 1e-5


@pytest.mark.parametrize("guidance", [7.0, 1.0])
def test_stage1_sample_equals_pipeline(base_pipe, text_embeds, guidance):
    emb = text_embeds["a photo of a dog"]
    neg = text_embeds[""] if guidance > 1 else None
    ref = base_pipe(prompt_embeds=emb, negative_prompt_embeds=neg, num_inference_steps=3,
                    guidance_scale=guidance, generator=torch.Generator().manual_seed(8), output_type="pt").images
    ours = sampling.sample(base_pipe.unet, base_pipe.scheduler, emb, neg, 3, guidance,
                           torch.Generator().manual_seed(8), 64)
    assert ours.shape == ref.shape == (1, 3, 64, 64)
    assert (ours - ref).abs().max() < 1e-5
    other = sampling.sample(base_pipe.unet, base_pipe.scheduler, emb, neg, 3, guidance,
                            torch.Generator().manual_seed(9), 64)
    assert (other - ours).abs().max() > 0.1  # the seed matters, so the match is not vacuous


def test_noise_level_changes_condition_and_training_loss(sr_pipe):
    """Level 0 vs 500 with everything else equal: a different condition, class label and loss."""
    unet, noising = sr_pipe.unet, sr_pipe.image_noising_scheduler
    g = torch.Generator().manual_seed(21)
    x0 = torch.nn.functional.interpolate(torch.rand(1, 3, 16, 16, generator=g) * 2 - 1, (256, 256), mode="bicubic",
                                         align_corners=False).clamp(-1, 1)
    noise = torch.randn(x0.shape, generator=g)
    emb = torch.randn(1, 77, T5_DIM, generator=g)
    t = torch.tensor([300])
    dm = DiffusionMath(sr_pipe.scheduler.alphas_cumprod)
    xt = dm.q_sample(x0, noise, t)
    task = Stage2Task(x0, noising, 0, 0)
    results = {}
    for level in (0, 500):
        batch = {"x0": x0, "lowres": data.downsample(x0, 64), "noise_level": torch.tensor([level])}
        inp, labels = task.model_input(xt, batch, torch.Generator().manual_seed(99))
        with torch.no_grad():
            out = unet(inp, t, encoder_hidden_states=emb, class_labels=labels, return_dict=False)[0]
        results[level] = (inp[:, 3:], labels, diffusion_loss(dm, out, x0, xt, noise, t).item())
    (c0, l0, loss0), (c500, l500, loss500) = results[0], results[500]
    up = noise_aug.upsample(data.downsample(x0, 64), 256)
    assert l0.tolist() == [0] and l500.tolist() == [500]
    assert (c0 - up).std() < 0.01  # level 0: the upsampled image plus std-0.006 noise
    assert 0.6 < (c500 - up * noising.alphas_cumprod[500].sqrt()).std() < 0.8  # level 500: std ~0.71
    assert (c0 - c500).abs().mean() > 0.3
    assert abs(loss0 - loss500) > 1e-3 * max(loss0, loss500), (loss0, loss500)
    # same level, same generator: the loss is reproducible, so the difference above is the level's doing
    batch = {"x0": x0, "lowres": data.downsample(x0, 64), "noise_level": torch.tensor([0])}
    inp, labels = task.model_input(xt, batch, torch.Generator().manual_seed(99))
    with torch.no_grad():
        again = diffusion_loss(dm, unet(inp, t, encoder_hidden_states=emb, class_labels=labels,
                                        return_dict=False)[0], x0, xt, noise, t).item()
    assert again == loss0
