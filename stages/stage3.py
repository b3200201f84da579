"""Stage III (optional, sampling only): 256 -> 1024 with diffusers' StableDiffusionUpscalePipeline,
which brings its own CLIP text encoder and takes the text prompt itself."""
from __future__ import annotations

import torch


def upscale(path: str, images: list, prompts: list[str], generators: list, steps: int, guidance_scale: float,
            noise_level: int, dtype: torch.dtype, batch_size: int, negative_prompt: str = "",
            progress: bool = False, device: torch.device | None = None) -> list:
    """PIL images in, PIL images (4x) out. On CUDA, model CPU offload keeps only the running part
    (text encoder, UNet or VAE) on this process's GPU (`device`; diffusers would pick cuda:0 for
    every process of a multi-GPU run). `progress`: one bar over the images."""
    from diffusers import StableDiffusionUpscalePipeline
    from tqdm.auto import tqdm

    pipe = StableDiffusionUpscalePipeline.from_pretrained(path, dtype=dtype)
    if torch.cuda.is_available():
        pipe.enable_model_cpu_offload(device=device or torch.device("cuda", torch.cuda.current_device()))
    pipe.set_progress_bar_config(disable=True)
    out = []
    bar = tqdm(total=len(images), desc="stage III (x4 upscale)", unit="image", disable=not progress)

    def on_step(i, t, latents):  # minutes per batch for real models: show the step beside the bar
        bar.set_postfix_str(f"step {i + 1}/{steps}", refresh=True)
    for start in range(0, len(images), batch_size):
        sl = slice(start, start + batch_size)
        n = len(images[sl])
        out += pipe(prompt=prompts[sl], image=images[sl], num_inference_steps=steps, guidance_scale=guidance_scale,
                    noise_level=noise_level, generator=generators[sl],
                    negative_prompt=[negative_prompt] * n if guidance_scale > 1 else None,
                    callback=on_step if progress else None).images
        bar.update(n)
    bar.close()
    del pipe
    return out
