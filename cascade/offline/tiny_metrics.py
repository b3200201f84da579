"""Tiny random-initialised DINO (ViTModel) and CLIP (CLIPModel) metric models with their processors,
saved with `save_pretrained` so the evaluation loads them through the same `from_pretrained` path as
facebook/dino-vits16 and openai/clip-vit-base-patch32. Their scores mean nothing; a marker file
lets every report say so. `--dino tiny` / `--clip tiny` build them into models.cache_dir."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch


TINY_METRICS_VERSION = "tiny-metrics-v1"
IMAGE_SIZE = 32
RANDOM_MARKER = "cascade_random_metric_model.json"  # its presence marks a random-initialised model


def _marker(folder: Path, what: str):
    (folder / RANDOM_MARKER).write_text(json.dumps({"model": what, "random_init": True, "seed": 0}))


def _char_tokenizer():
    """A CLIP BPE tokenizer over printable ASCII characters (no merges): real tokenization of prompts."""
    from transformers import CLIPTokenizer

    chars = [chr(c) for c in range(33, 127)]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[])


def build_dino(folder: Path) -> Path:
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(0)
    cfg = ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    image_size=IMAGE_SIZE, patch_size=8)
    ViTModel(cfg, add_pooling_layer=False).save_pretrained(folder)
    ViTImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(folder)
    _marker(folder, "dino")
    return folder


def build_clip(folder: Path) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    torch.manual_seed(0)
    tok = _char_tokenizer()
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  image_size=IMAGE_SIZE, patch_size=8)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(folder)
    image_proc = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                    crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    CLIPProcessor(image_processor=image_proc, tokenizer=tok).save_pretrained(folder)
    _marker(folder, "clip")
    return folder


def tiny_metric_model(cache_dir: str, which: str) -> str:
    """The folder of the tiny `which` (dino|clip) model under cache_dir, built on first use (written
    to a temporary folder and renamed, so concurrent first uses are safe)."""
    root = Path(os.path.expanduser(cache_dir)) / TINY_METRICS_VERSION
    target = root / which
    if not (target / RANDOM_MARKER).is_file():
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{which}-"))
        (build_dino if which == "dino" else build_clip)(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def resolve_metric_model(name: str, cache_dir: str, which: str) -> str:
    return tiny_metric_model(cache_dir, which) if name == "tiny" else name
