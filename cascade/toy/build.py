"""The toy cascade's components, in the IF architecture and the diffusers folder layout.

A tiny T5 v1.1 encoder (random, frozen: it only has to give each grammar word its own vectors) with
a real SentencePiece tokenizer trained on the grammar, an IF-I style 16 px UNet and an IF-II style
16 -> 64 px UNet. Stage II predicts v instead of epsilon: with the cosine schedule a 64 px image's
mean colour is decided at t > 0.99 T, where an epsilon model's implied x0 is noise; a v model
predicts x0 itself there, so the low frequencies follow the low-res condition.
"""
from __future__ import annotations

import random
from pathlib import Path

from cascade.offline import tiny
from cascade.toy import world

BUILD_SEED = 0


def _corpus() -> list[str]:
    """The tiny encoder's corpus (real and pseudo-words, so rare identifier tokens exist) plus the grammar."""
    rng = random.Random(BUILD_SEED)
    caps = world.all_captions()
    return tiny._corpus() + [rng.choice(caps) for _ in range(20000)]


def build_tokenizer(folder: Path):
    """The SentencePiece model trained on tiny's corpus plus the grammar; every grammar word must get
    its own known ids."""
    return tiny.train_tokenizer(_corpus(), [*world.COLOURS, *world.SHAPES, *world.PATTERNS, world.CLASS_NOUN],
                                folder)


def stage1_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=world.LO, in_channels=3, block_out_channels=(32, 64, 64),
                                down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D",
                                                  "SimpleCrossAttnDownBlock2D"),
                                up_block_types=("SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D",
                                                "ResnetUpsampleBlock2D"),
                                **tiny._unet_common())


def stage2_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=world.HI, in_channels=6, block_out_channels=(16, 32, 64, 64),
                                down_block_types=("ResnetDownsampleBlock2D",) * 3 + ("SimpleCrossAttnDownBlock2D",),
                                up_block_types=("SimpleCrossAttnUpBlock2D",) + ("ResnetUpsampleBlock2D",) * 3,
                                class_embed_type="timestep", time_embedding_act_fn="gelu", **tiny._unet_common())


def stage2_scheduler():
    s = tiny.if_scheduler(1.0)
    return s.__class__.from_config(s.config, prediction_type="v_prediction")


def save_stage1(folder: Path, tokenizer, text_encoder, unet):
    from diffusers import IFPipeline

    IFPipeline(tokenizer=tokenizer, text_encoder=text_encoder, unet=unet, scheduler=tiny.if_scheduler(1.5),
               safety_checker=None, feature_extractor=None, watermarker=None,
               requires_safety_checker=False).save_pretrained(folder)


def save_stage2(folder: Path, unet):
    from diffusers import IFSuperResolutionPipeline

    IFSuperResolutionPipeline(tokenizer=None, text_encoder=None, unet=unet, scheduler=stage2_scheduler(),
                              image_noising_scheduler=tiny.if_noising_scheduler(), safety_checker=None,
                              feature_extractor=None, watermarker=None,
                              requires_safety_checker=False).save_pretrained(folder)
