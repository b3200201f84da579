"""The toy cascade's components, in the IF architecture and the diffusers folder layout.

A tiny T5 v1.1 encoder (random, frozen: it only has to give each grammar word its own vectors) with
a real SentencePiece tokenizer trained on the grammar, an IF-I style 16 px UNet and an IF-II style
16 -> 64 px UNet. Stage II predicts v instead of epsilon: with the cosine schedule a 64 px image's
mean colour is decided at t > 0.99 T, where an epsilon model's implied x0 is noise; a v model
predicts x0 itself there, so the low frequencies follow the low-res condition.
"""
from __future__ import annotations

import io
import random
import tempfile
from pathlib import Path

from cascade import tiny
from cascade.toy import world

BUILD_SEED = 0


def _corpus() -> list[str]:
    """The tiny encoder's corpus (real and pseudo-words, so rare identifier tokens exist) plus the grammar."""
    rng = random.Random(BUILD_SEED)
    caps = world.all_captions()
    return tiny._corpus() + [rng.choice(caps) for _ in range(20000)]


def build_tokenizer(folder: Path):
    """Train the SentencePiece model (T5 ids: pad 0, eos 1, unk 2) and check that it tokenizes."""
    import sentencepiece as spm
    from transformers import T5Tokenizer

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(_corpus()), model_writer=buf, vocab_size=16000,
                                   hard_vocab_limit=False, model_type="unigram", pad_id=0, eos_id=1, unk_id=2,
                                   bos_id=-1, num_threads=1, character_coverage=1.0, minloglevel=2)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "spiece.model").write_bytes(buf.getvalue())
        tok = T5Tokenizer.from_pretrained(tmp, extra_ids=100)  # T5Tokenizer(vocab_file=) ignores the file
    words = [*world.COLOURS, *world.SHAPES, *world.PATTERNS, world.CLASS_NOUN]
    ids = [tuple(tok(w, add_special_tokens=False).input_ids) for w in words]
    if len(set(ids)) != len(ids) or any(tok.unk_token_id in i for i in ids):
        raise RuntimeError("toy tokenizer does not tell the grammar's words apart")
    tok.save_pretrained(folder)
    return tok


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
