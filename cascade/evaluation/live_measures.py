"""Live DreamBooth measures with DINO / CLIP-I, when those models are already in the local cache (or
folders): nothing is downloaded and no network is asked (the check reads the cache only).

  fidelity  = mean DINO cosine of "a [V] <class>" samples to the subject photos (CLIP-I when no DINO);
  clip_i    = the same with CLIP image embeddings, when CLIP is cached;
  drift     = mean cosine of "a <class>" samples to the subject photos (PRES, with the same model);
  diversity = 1 - mean pairwise cosine among the "a <class>" samples (DIV, with the same model).
"""
from __future__ import annotations

from pathlib import Path

import torch

from cascade.evaluation import metrics
from cascade.validation import Measures
from stages import data


def cached(name: str) -> bool:
    """A folder, or a hub id whose config.json the local Hugging Face cache holds (no network)."""
    p = Path(name).expanduser()
    if p.is_dir():
        return (p / "config.json").is_file()
    if name.count("/") != 1:
        return False
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(name, "config.json")
    return isinstance(found, str)


def _mean_pairwise(e: torch.Tensor) -> float:
    n = e.shape[0]
    if n < 2:
        return float("nan")
    return float(((e @ e.T).sum() - n) / (n * (n - 1)))


def build(subject: str | Path, dino: str = metrics.DEFAULT_DINO, clip: str = metrics.DEFAULT_CLIP,
          device: str = "cpu", with_class: bool = True) -> Measures | None:
    """Measures against the photos in `subject`, or None when neither model is cached. The models and
    photos load at the first validation (the cache check alone decides what will be measured).
    `with_class`: the validation has "a <class>" samples (drift and diversity measured)."""
    kinds = {k: name for k, name in (("dino", dino), ("clip_i", clip)) if cached(name)}
    if not kinds:
        return None
    main = "dino" if "dino" in kinds else "clip_i"
    state: dict = {}

    def load():
        make = {"dino": metrics.DinoScorer, "clip_i": metrics.ClipScorer}
        state["scorers"] = {k: make[k](name, device) for k, name in kinds.items()}
        photos = data.load_folder(subject, 1, "subject")
        state["real"] = {k: s.embed(photos) for k, s in state["scorers"].items()}

    def measure(subject_samples: torch.Tensor, klass: torch.Tensor) -> dict:
        if not state:
            load()
        out = {}
        for k, s in state["scorers"].items():
            out[k] = float(metrics.mean_cosine(s.embed(data.to_pil(subject_samples)), state["real"][k]).mean())
            if len(klass):
                cls = s.embed(data.to_pil(klass))
                out[f"pres_{k}"] = float(metrics.mean_cosine(cls, state["real"][k]).mean())
                out[f"div_{k}"] = 1.0 - _mean_pairwise(cls)
        out["fidelity"] = out[main]
        if f"pres_{main}" in out:
            out["drift"], out["diversity"] = out[f"pres_{main}"], out[f"div_{main}"]
        return out

    names = ["fidelity", "drift", "diversity"] + [x for k in kinds for x in (k, f"pres_{k}", f"div_{k}")]
    if not with_class:
        names = [n for n in names if n in ["fidelity", *kinds]]
    source = " + ".join(f"{k.upper()} {name}" + (" (RANDOM weights: meaningless)" if metrics.is_random(name) else "")
                        for k, name in kinds.items())
    return Measures(tuple(names), measure, source)
