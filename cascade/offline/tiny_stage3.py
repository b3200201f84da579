"""A tiny x4 upscaler (StableDiffusionUpscalePipeline layout) for offline stage III runs: VAE with
a 4x latent downscale, a 7-channel UNet conditioned on the noise level, a tiny CLIP text encoder
and a byte-level BPE tokenizer we write ourselves. Random weights: its images are noise."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

WORDS = ("a an the of in on with photo dog cat toy red blue on beach snow high resolution sharp detailed "
         "jungle city street floor").split()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map, which CLIP's BPE vocabulary uses."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, n = keep[:], 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(keep, map(chr, chars)))


def build_clip_tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols]
    merges = []
    for word in WORDS:  # merge each word left to right into one token
        cur = word[0]
        for i, ch in enumerate(word[1:], 1):
            nxt = ch + ("</w>" if i == len(word) - 1 else "")
            merges.append(f"{cur} {nxt}")
            cur = cur + nxt
            vocab.append(cur)
    vocab = list(dict.fromkeys(vocab + ["<|startoftext|>", "<|endoftext|>"]))
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
        # from_pretrained reads the files; the constructor may ignore them (transformers 5.x)
        tok = CLIPTokenizer.from_pretrained(tmp, model_max_length=77)
    if tok("a dog").input_ids == tok("a cat").input_ids:
        raise RuntimeError("tiny CLIP tokenizer does not tokenize")
    return tok


def build_tiny_upscaler(folder: Path):
    from diffusers import (AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionUpscalePipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel

    tok = build_clip_tokenizer(folder)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                        num_attention_heads=4, num_hidden_layers=2, max_position_embeddings=77,
                                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                        pad_token_id=tok.pad_token_id))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 16, 32),
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        layers_per_block=1, norm_num_groups=8, scaling_factor=0.08333,
                        mid_block_add_attention=False)  # its mid-block would attend over 256x256 latent tokens
    # attention only at the coarsest level: a 256x256 latent (1024px output) stays cheap on CPU
    unet = UNet2DConditionModel(sample_size=64, in_channels=7, out_channels=4, layers_per_block=1,
                                block_out_channels=(16, 16, 32, 32),
                                down_block_types=("DownBlock2D",) * 3 + ("CrossAttnDownBlock2D",),
                                up_block_types=("CrossAttnUpBlock2D",) + ("UpBlock2D",) * 3, cross_attention_dim=32,
                                attention_head_dim=8, num_class_embeds=1000, norm_num_groups=8)
    pipe = StableDiffusionUpscalePipeline(
        vae=vae, text_encoder=text, tokenizer=tok, unet=unet,
        low_res_scheduler=DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear",
                                        beta_start=0.0001, beta_end=0.02),
        scheduler=DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.0001,
                                beta_end=0.02, prediction_type="v_prediction", clip_sample=False,
                                set_alpha_to_one=False, steps_offset=1),
        max_noise_level=350)
    pipe.save_pretrained(folder)
