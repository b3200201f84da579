"""T5 text embeddings: encoded once the way IF's pipelines do, cached on disk, T5 released after.

Stages never see the text encoder; they receive these [1, 77, D] tensors. The cache key is the
encoder's identity (path or hub id, its weight file digest when local), the max length and the
prompt, so a changed model never serves stale embeddings.
"""
from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)


def preprocess(prompt: str) -> str:
    """IFPipeline's `_text_preprocessing` with clean_caption=False: lower-case and strip."""
    return prompt.lower().strip()


def shorten(text: str, limit: int = 80) -> str:
    """A prompt fit for a log line: long ones are cut, with their length said."""
    if len(text) <= limit:
        return text
    return f"{text[:limit].rstrip()}... ({len(text.split())} words)"


def load_tokenizer(source: str, setting: str = "models.text_encoder"):
    """The prompt tokenizer; a folder asking for its own code is refused, and transformers is told
    never to run remote code (it would otherwise ask on a terminal)."""
    from transformers import AutoTokenizer

    from cascade.model_checks import refuse_custom_code

    refuse_custom_code(source, setting)
    return AutoTokenizer.from_pretrained(source, subfolder="tokenizer", trust_remote_code=False)


def _encoder_identity(source: str) -> str:
    folder = Path(source) / "text_encoder"
    if folder.is_dir():
        files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".json"))
        return str(Path(source).resolve()) + "|" + "|".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}"
                                                          for p in files)
    return source


class TextEncoder:
    """Encode prompt sets with T5, caching each prompt's embedding; T5 loads only on a cache miss."""

    def __init__(self, source: str, cache_dir: str | Path, max_length: int = 77, dtype: torch.dtype = torch.float32,
                 variant: str | None = None, device: str | None = None):
        self.source, self.max_length, self.dtype, self.variant = source, max_length, dtype, variant
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.cache = Path(os.path.expanduser(str(cache_dir))) / "text-embeddings"
        self.identity = _encoder_identity(source)
        self.calls = 0  # number of times T5 actually ran (tests check "once per prompt set")

    def _key(self, prompt: str) -> Path:
        h = hashlib.sha256(json.dumps([self.identity, self.max_length, prompt]).encode()).hexdigest()[:32]
        return self.cache / f"{h}.safetensors"

    def check_lengths(self, prompts: list[str]) -> list[str]:
        """Prompts longer than max_length tokens are truncated by T5 encoding; warn by name."""
        tok = load_tokenizer(self.source)
        long = [p for p in prompts if len(tok(preprocess(p)).input_ids) > self.max_length]
        for p in long:
            log.warning("prompt longer than %d T5 tokens is truncated: %r", self.max_length, shorten(p))
        return long

    def encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """prompt -> [1, max_length, D] embedding, from the cache or one T5 pass over the misses."""
        out, missing = {}, []
        for p in dict.fromkeys(prompts):
            f = self._key(p)
            if f.is_file():
                out[p] = load_file(f)["embeds"]
            else:
                missing.append(p)
        if missing:
            writable = True
            for p, e in zip(missing, self._run_t5(missing)):
                out[p] = e
                if not writable:
                    continue
                try:
                    self.cache.mkdir(parents=True, exist_ok=True)
                    tmp = self._key(p).with_suffix(".tmp")
                    save_file({"embeds": e.contiguous()}, str(tmp))
                    os.replace(tmp, self._key(p))
                except Exception as err:  # noqa: BLE001 - e.g. a read-only cache; the embeddings are still good
                    log.warning("models.cache_dir: cannot write the text-embedding cache %s (%s); continuing "
                                "without it", self.cache, getattr(err, "strerror", None) or err)
                    writable = False
        return out

    @torch.no_grad()
    def _run_t5(self, prompts: list[str]) -> list[torch.Tensor]:
        from transformers import T5EncoderModel

        self.calls += 1
        tok = load_tokenizer(self.source)
        # on the CPU in fp32 (19 GB of host RAM for T5-XXL): half-precision matmuls have no fast kernels
        # on many CPUs (bf16 ran 15x slower than fp32 here) and T5 is prone to fp16 overflow
        dtype = torch.float32 if self.device == "cpu" else self.dtype
        model = T5EncoderModel.from_pretrained(self.source, subfolder="text_encoder", dtype=dtype,
                                               variant=self.variant).to(self.device)
        texts = [preprocess(p) for p in prompts]
        inputs = tok(texts, padding="max_length", max_length=self.max_length, truncation=True,
                     add_special_tokens=True, return_tensors="pt")
        embeds = model(inputs.input_ids.to(self.device), attention_mask=inputs.attention_mask.to(self.device))[0]
        result = [e.unsqueeze(0).float().cpu() for e in embeds]
        del model  # release T5 before any UNet loads
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return result
