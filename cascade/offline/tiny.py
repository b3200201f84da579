"""Tiny, architecturally faithful IF components in the real diffusers folder layout.

No weights can be downloaded here, so tests and the offline demo build their own: a tiny T5 v1.1
encoder with a real SentencePiece tokenizer, IF-style stage I / stage II UNets (6 output channels,
learned-range variance, text-proj + text-pooled addition embedding, noise-level class embedding),
IF's schedulers, and a tiny x4 upscaler for stage III. They are random-initialised: their images
are noise. Everything is written with `save_pretrained` and loaded back with `from_pretrained`,
the same code path users take with hub ids.
"""
from __future__ import annotations

import io
import json
import logging
import os
import random
import shutil
import tempfile
from pathlib import Path

import torch

from stages.errors import InputError

log = logging.getLogger(__name__)

TINY_VERSION = "tiny-v1"
T5_DIM = 32
BUILD_SEED = 0


def if_scheduler(sample_max_value: float) -> "DDPMScheduler":
    """IF's sampling scheduler: cosine betas, epsilon, learned-range variance, dynamic thresholding."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon",
                         variance_type="learned_range", thresholding=True, dynamic_thresholding_ratio=0.95,
                         sample_max_value=sample_max_value, clip_sample=True, clip_sample_range=1.0)


def if_noising_scheduler() -> "DDPMScheduler":
    """IF's stage II `image_noising_scheduler` (noise augmentation of the low-res condition)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")


def _corpus() -> list[str]:
    """Deterministic training text for the tiny SentencePiece model: real prompt words plus
    pseudo-words, so that real words tokenize and many short pieces land in the rare-id range."""
    rng = random.Random(BUILD_SEED)
    cons, vow = "bcdfghjklmnprstvwz", "aeiou"
    words = ["".join(rng.choice(cons) + rng.choice(vow) for _ in range(rng.randint(2, 4))) for _ in range(3000)]
    short = [c + v + d for c in cons for v in vow for d in cons]
    english = ("a an the of in on with photo dog cat backpack can teapot robot toy stuffed animal bowl "
               "candle clock sneaker boot glasses cartoon vase jungle snow beach cobblestone street top pink "
               "fabric wooden floor city background mountain blue house purple rug forest wheat field tree "
               "autumn leaves eiffel tower floating water ocean milk green grass sunflowers around it mirror "
               "sidewalk crowded dirt road white red shiny wet cube shaped wearing hat santa rainbow scarf "
               "chef outfit police firefighter sleeping bag bucket").split()
    lines = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(20000)]
    lines += [" ".join(rng.sample(short, 12)) for _ in range(400)]
    lines += [" ".join(rng.sample(english, 10)) for _ in range(3000)]
    return lines


def train_tokenizer(corpus: list[str], words, folder: Path):
    """Train a SentencePiece unigram model on `corpus` (T5 ids: pad 0, eos 1, unk 2), check that each
    of `words` gets its own known ids, and save it as a T5 tokenizer in `folder`."""
    import sentencepiece as spm
    from transformers import T5Tokenizer

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=buf, vocab_size=16000,
                                   hard_vocab_limit=False, model_type="unigram", pad_id=0, eos_id=1, unk_id=2,
                                   bos_id=-1, num_threads=1, character_coverage=1.0, minloglevel=2)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "spiece.model").write_bytes(buf.getvalue())
        # from_pretrained on a folder with spiece.model really converts it; T5Tokenizer(vocab_file=...)
        # silently builds an empty vocabulary with transformers 5.x.
        tok = T5Tokenizer.from_pretrained(tmp, extra_ids=100)
    ids = [tuple(tok(w, add_special_tokens=False).input_ids) for w in words]
    if len(set(ids)) != len(ids) or any(tok.unk_token_id in i for i in ids):
        raise RuntimeError(f"trained tokenizer does not tell these words apart: {', '.join(words)}")
    tok.save_pretrained(folder)
    return tok


def build_tokenizer(folder: Path):
    return train_tokenizer(_corpus(), ("dog", "cat"), folder)


def build_text_encoder(vocab_size: int):
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(vocab_size=vocab_size, d_model=T5_DIM, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                   feed_forward_proj="gated-gelu", relative_attention_num_buckets=8, dropout_rate=0.0)
    return T5EncoderModel(cfg)


def _unet_common() -> dict:
    # The IF UNet family: scale-shift ResNets with skip-time activation, 1/0.7 output scaling, GELU,
    # text projection into cross-attention and attention-pooled text in the time embedding.
    return dict(layers_per_block=1, out_channels=6, act_fn="gelu", resnet_time_scale_shift="scale_shift",
                resnet_skip_time_act=True, resnet_out_scale_factor=1 / 0.7, mid_block_scale_factor=1 / 0.7,
                cross_attention_dim=64, encoder_hid_dim=T5_DIM, encoder_hid_dim_type="text_proj",
                attention_head_dim=16, addition_embed_type="text", addition_embed_type_num_heads=2,
                cross_attention_norm="group_norm", mid_block_type="UNetMidBlock2DSimpleCrossAttn", norm_num_groups=8)


def build_stage1_unet(sample_size: int = 64):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=sample_size, in_channels=3, block_out_channels=(32, 64),
                                down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
                                up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
                                **_unet_common())


def build_stage2_unet(sample_size: int = 256):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=sample_size, in_channels=6, block_out_channels=(16, 32, 64, 64),
                                down_block_types=("ResnetDownsampleBlock2D",) * 3 + ("SimpleCrossAttnDownBlock2D",),
                                up_block_types=("SimpleCrossAttnUpBlock2D",) + ("ResnetUpsampleBlock2D",) * 3,
                                class_embed_type="timestep", time_embedding_act_fn="gelu", **_unet_common())


def check_sizes(sizes: tuple[int, int]):
    """Stage I's tiny UNet halves its input once, stage II's three times; II must upsample I."""
    low, high = sizes
    if low < 4 or low % 2 or high % 8 or high <= low:
        raise InputError(f"tiny sizes {low}:{high}: stage I's must be even and >= 4, stage II's a multiple "
                         f"of 8 and larger than stage I's (IF: 64:256)")


def build_tiny(output: Path, with_stage3: bool = True, sizes: tuple[int, int] = (64, 256)) -> Path:
    """Write stage1/ (IFPipeline with T5 + tokenizer), stage2/ (IFSuperResolutionPipeline) and
    stage3/ (StableDiffusionUpscalePipeline) under `output`, atomically (temp folder + rename).
    `sizes`: the stage I and stage II UNets' sample sizes (IF's 64 -> 256 by default)."""
    from diffusers import IFPipeline, IFSuperResolutionPipeline

    output = Path(output)
    check_sizes(sizes)
    file = next((p for p in (output, *output.parents) if p.exists() and not p.is_dir()), None)
    if file is not None:  # bad input (exit 2), not an OSError from mkdir
        raise InputError(f"--output {output}: {'it' if file == output else file} is a file, not a folder; give a "
                         f"new folder path")
    if output.exists() and any(output.iterdir()):
        raise InputError(f"{output} exists and is not empty; choose another --output")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=output.parent))
    try:
        torch.manual_seed(BUILD_SEED)
        tok = build_tokenizer(tmp / "tokenizer-src")
        text_encoder = build_text_encoder(len(tok))
        off = dict(safety_checker=None, feature_extractor=None, watermarker=None, requires_safety_checker=False)
        IFPipeline(tokenizer=tok, text_encoder=text_encoder, unet=build_stage1_unet(sizes[0]),
                   scheduler=if_scheduler(1.5), **off).save_pretrained(tmp / "stage1")
        IFSuperResolutionPipeline(tokenizer=None, text_encoder=None, unet=build_stage2_unet(sizes[1]),
                                  scheduler=if_scheduler(1.0), image_noising_scheduler=if_noising_scheduler(),
                                  **off).save_pretrained(tmp / "stage2")
        if with_stage3:
            from cascade.offline.tiny_stage3 import build_tiny_upscaler

            build_tiny_upscaler(tmp / "stage3")
        shutil.rmtree(tmp / "tokenizer-src")
        (tmp / "BUILD.json").write_text(json.dumps({"version": TINY_VERSION, "seed": BUILD_SEED, "sizes": list(sizes),
                                                    "note": "random-initialised tiny components; images are noise"}))
        if output.exists():
            output.rmdir()
        os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output


def tiny_root(cache_dir: str) -> Path:
    """The shared tiny components, built on first use."""
    root = Path(os.path.expanduser(cache_dir)) / TINY_VERSION
    if not (root / "BUILD.json").exists():
        log.info("building tiny IF components into %s (first use)", root)
        try:
            build_tiny(root)
        except (OSError, InputError) as e:
            if not (root / "BUILD.json").exists():  # not just another process finishing first
                if isinstance(e, OSError):
                    raise InputError(f"models.cache_dir={cache_dir}: cannot build the tiny components in {root} "
                                     f"({e.strerror or e}); point models.cache_dir at a writable folder") from None
                raise
    return root


def _source():
    from cascade.model_sources import Source

    return Source(root=tiny_root, marker=TINY_VERSION, random_weights=True)


SOURCE = _source()  # `models.stageN: tiny` (entry point cascade.model_sources:tiny)
