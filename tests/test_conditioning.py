"""Stage II conditioning is IFSuperResolutionPipeline's, and our sampler reproduces both IF pipelines."""
from __future__ import annotations

import torch

from stages import noise_aug, sampling

OFF = dict(safety_checker=None, watermarker=None, feature_extractor=None, requires_safety_checker=False)


def _embeds(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 77, 32, generator=g), torch.randn(1, 77, 32, generator=g)


def _sr_pipe(tiny):
    from diffusers import IFSuperResolutionPipeline

    pipe = IFSuperResolutionPipeline.from_pretrained(tiny / "stage2", **OFF)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_condition_equals_pipeline(tiny):
    pipe = _sr_pipe(tiny)
    seen = {}
    real_forward = pipe.unet.forward

    def spy(sample, timestep, *args, class_labels=None, **kw):
        seen.setdefault("input", sample.clone())
        seen.setdefault("class_labels", class_labels.clone())
        return real_forward(sample, timestep, *args, class_labels=class_labels, **kw)

    pipe.unet.forward = spy
    low = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3)) * 2 - 1
    emb, neg = _embeds()
    pipe(image=low, prompt_embeds=emb, negative_prompt_embeds=neg, num_inference_steps=1, noise_level=37,
         generator=torch.Generator().manual_seed(5), output_type="pt")
    # the pipeline draws the initial x_T first, then the condition noise, from the same generator
    g = torch.Generator().manual_seed(5)
    torch.randn(1, 3, 256, 256, generator=g)
    ours = noise_aug.noised_condition(low, 256, torch.tensor([37]), pipe.image_noising_scheduler, generator=g)
    assert torch.allclose(seen["input"][1:, 3:], ours, atol=1e-6)  # conditional half, channels 3..5
    assert seen["class_labels"].tolist() == [37, 37]
    # and noise level 0 is not 37: the level reaches the condition
    g = torch.Generator().manual_seed(5)
    torch.randn(1, 3, 256, 256, generator=g)
    other = noise_aug.noised_condition(low, 256, torch.tensor([0]), pipe.image_noising_scheduler, generator=g)
    assert (other - ours).abs().max() > 0.01


def test_sampler_reproduces_sr_pipeline(tiny):
    pipe = _sr_pipe(tiny)
    low = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3)) * 2 - 1
    emb, neg = _embeds()
    emb2 = emb.expand(2, -1, -1)
    ref = pipe(image=low, prompt_embeds=emb2, negative_prompt_embeds=neg.expand(2, -1, -1), num_inference_steps=3,
               noise_level=100, guidance_scale=4.0, generator=torch.Generator().manual_seed(9), output_type="pt").images
    ours = sampling.sample(pipe.unet, pipe.scheduler, emb2, neg, 3, 4.0, torch.Generator().manual_seed(9),
                           resolution=256, lowres=low, noise_level=100, noising_scheduler=pipe.image_noising_scheduler)
    assert torch.allclose(ours, ref, atol=1e-5)


def test_sampler_reproduces_if_pipeline(tiny):
    from diffusers import IFPipeline

    pipe = IFPipeline.from_pretrained(tiny / "stage1", **OFF)
    pipe.set_progress_bar_config(disable=True)
    emb, neg = _embeds(1)
    gens = [torch.Generator().manual_seed(s) for s in (4, 8)]
    ref = pipe(prompt_embeds=emb.expand(2, -1, -1), negative_prompt_embeds=neg.expand(2, -1, -1),
               num_inference_steps=4, generator=gens, output_type="pt").images
    gens = [torch.Generator().manual_seed(s) for s in (4, 8)]
    ours = sampling.sample(pipe.unet, pipe.scheduler, emb.expand(2, -1, -1), neg, 4, 7.0, gens, resolution=64)
    assert torch.allclose(ours, ref, atol=1e-5)


def test_training_noise_levels_and_loss_depend_on_level(tiny):
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from stages.losses import DiffusionMath, diffusion_loss
    from stages.stage2 import Stage2Task

    noising = DDPMScheduler.from_pretrained(tiny / "stage2", subfolder="image_noising_scheduler")
    unet = UNet2DConditionModel.from_pretrained(tiny / "stage2", subfolder="unet")
    math_ = DiffusionMath(DDPMScheduler.from_pretrained(tiny / "stage2", subfolder="scheduler").alphas_cumprod)
    x = torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(0)) * 2 - 1
    levels = noise_aug.sample_noise_levels(1000, 3, 17, torch.Generator().manual_seed(0))
    assert levels.min() == 3 and levels.max() == 17

    losses, conds = [], []
    for level in (0, 500):
        task = Stage2Task(x, noising, level, level)
        batch = task.batch(2, False, torch.Generator().manual_seed(1))
        assert batch["noise_level"].tolist() == [level, level]
        g = torch.Generator().manual_seed(2)
        noise = torch.randn(batch["x0"].shape, generator=g)
        t = torch.tensor([50, 50])
        xt = math_.q_sample(batch["x0"], noise, t)
        inp, labels = task.model_input(xt, batch, torch.Generator().manual_seed(3))
        assert labels.tolist() == [level, level] and inp.shape[1] == 6
        conds.append(inp[:, 3:])
        with torch.no_grad():
            out = unet(inp, t, encoder_hidden_states=torch.zeros(2, 77, 32), class_labels=labels).sample
        losses.append(diffusion_loss(math_, out, batch["x0"], xt, noise, t).mean().item())
    assert (conds[0] - conds[1]).abs().mean() > 0.1 and abs(losses[0] - losses[1]) > 1e-4
