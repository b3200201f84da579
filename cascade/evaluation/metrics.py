"""DreamBench measurement: the prompt lists, and the DINO / CLIP models that score images.

Metric models load with transformers by name (a hub id in the local cache, or a folder) with the
preprocessing their own processor defines; nothing is downloaded here, so a missing model stops
the command with one line naming it. Definitions follow the DreamBooth paper (design notes §2):
DINO = cosine of ViT-S/16 CLS embeddings, CLIP-I = cosine of CLIP image embeddings, both averaged
over (generated, real) pairs; CLIP-T = cosine of CLIP image and prompt embeddings.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from cascade.offline.tiny_metrics import RANDOM_MARKER  # beside a random-initialised metric model
from stages.errors import InputError

DEFAULT_DINO = "facebook/dino-vits16"
DEFAULT_CLIP = "openai/clip-vit-base-patch32"
PACKAGED_PROMPTS = Path(__file__).resolve().parent / "data" / "dreambench_prompts.txt"
PROMPTS_FILENAME = "prompts_and_classes.txt"
LIVE_CLASSES = {"dog", "cat"}  # DreamBench's 9 live subjects are its cats and dogs


class MetricModelError(InputError):
    """A metric model (or its processor) that cannot be loaded; the message names it."""


@dataclass
class DreamBench:
    classes: dict[str, str]  # subject folder name -> class noun
    object_prompts: list[str]  # templates with {0} = identifier, {1} = class
    live_prompts: list[str]
    source: str

    def templates(self, class_noun: str) -> list[str]:
        return self.live_prompts if class_noun in LIVE_CLASSES else self.object_prompts


def parse_prompts(text: str, source: str = "") -> DreamBench:
    """Parse DreamBench's prompts_and_classes.txt: the class table, then the object and the live
    subject prompt lists (Python `'...'.format(...)` lines)."""
    lines = [ln.strip() for ln in text.splitlines() if not ln.startswith("#")]
    classes, lists, current = {}, {}, None
    for ln in lines:
        if ln in ("Object Prompts", "Live Subject Prompts"):
            current = lists.setdefault(ln, [])
        elif current is not None and (m := re.match(r"^'(.*)'\.format\(", ln)):
            current.append(m.group(1))
        elif current is None and ln.count(",") == 1 and ln != "subject_name,class":
            name, cls = ln.split(",")
            classes[name.strip()] = cls.strip()
    obj, live = lists.get("Object Prompts", []), lists.get("Live Subject Prompts", [])
    if not classes or not obj or not live:
        raise InputError(f"{source or 'prompts file'}: not a DreamBench prompts_and_classes.txt "
                         f"({len(classes)} classes, {len(obj)} object and {len(live)} live prompts found)")
    return DreamBench(classes, obj, live, source)


def load_dreambench(dataset: str | None = None) -> DreamBench:
    """From DATASET/prompts_and_classes.txt when a dataset folder is named, else the packaged copy."""
    path = Path(dataset) / PROMPTS_FILENAME if dataset else PACKAGED_PROMPTS
    if not path.is_file():
        raise InputError(f"--dataset {dataset}: no {PROMPTS_FILENAME} in that folder")
    return parse_prompts(path.read_text(), str(path))


def fill(template: str, identifier: str, class_noun: str) -> str:
    return template.format(identifier, class_noun)


def clip_t_prompt(template: str, class_noun: str) -> str:
    """The prompt CLIP-T scores against: the identifier removed, the class kept ("a dog in the snow"),
    since CLIP's text encoder has never seen the rare token."""
    return " ".join(template.format("", class_noun).split())


def _features(out) -> torch.Tensor:
    """transformers 5 returns an output object whose pooler_output is the projected embedding;
    older versions return the tensor itself."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _load_failed(what: str, name: str, e: Exception) -> MetricModelError:
    first = str(e).strip().splitlines()[0][:160] if str(e).strip() else e.__class__.__name__
    return MetricModelError(f"{what} model '{name}' cannot be loaded from the local cache or folder "
                            f"(pass --{what.lower()} a folder or a cached hub id): {first}")


def _load(loader, name: str, what: str, **kw):
    """`loader.from_pretrained(name)`: a folder, else the local HF cache, else the hub (which fails
    offline); every failure becomes one line naming the model."""
    looks_local = name.startswith((".", "/", "~")) or Path(name).exists() or name.count("/") != 1
    if looks_local and not Path(name).expanduser().is_dir():
        raise MetricModelError(f"{what} model folder not found: {name} (pass --{what.lower()} a folder or hub id)")
    try:
        return loader.from_pretrained(name, local_files_only=True, **kw)
    except (OSError, ValueError) as e:
        if looks_local:
            raise _load_failed(what, name, e) from None
    from cascade import model_checks

    model_checks.check_hub_model(name, f"--{what.lower()}")  # one 3 s probe, not minutes of retries
    try:
        return loader.from_pretrained(name, **kw)
    except (OSError, ValueError) as e:
        raise _load_failed(what, name, e) from None


def is_random(name: str) -> bool:
    return (Path(name) / RANDOM_MARKER).is_file()


@torch.no_grad()
def _embed_images(scorer, images: list, batch: int, forward) -> torch.Tensor:
    """L2-normalised image embeddings, `batch` images at a time through the scorer's processor."""
    out = []
    for i in range(0, len(images), batch):
        px = scorer.processor(images=images[i:i + batch], return_tensors="pt")["pixel_values"].to(scorer.device)
        out.append(forward(px).float().cpu())
    return torch.nn.functional.normalize(torch.cat(out), dim=-1)


class DinoScorer:
    """ViT CLS embeddings (facebook/dino-vits16 by default), L2-normalised."""

    def __init__(self, name: str = DEFAULT_DINO, device: str = "cpu"):
        from transformers import AutoImageProcessor, ViTModel

        self.processor = _load(AutoImageProcessor, name, "DINO")
        self.model = _load(ViTModel, name, "DINO", add_pooling_layer=False).to(device).eval()
        self.name, self.device, self.random = name, device, is_random(name)

    def embed(self, images: list, batch: int = 16) -> torch.Tensor:
        return _embed_images(self, images, batch, lambda px: self.model(pixel_values=px).last_hidden_state[:, 0])


class ClipScorer:
    """CLIP image and text embeddings (openai/clip-vit-base-patch32 by default), L2-normalised."""

    def __init__(self, name: str = DEFAULT_CLIP, device: str = "cpu"):
        from transformers import AutoProcessor, CLIPModel

        self.processor = _load(AutoProcessor, name, "CLIP")
        self.model = _load(CLIPModel, name, "CLIP").to(device).eval()
        self.name, self.device, self.random = name, device, is_random(name)

    def embed(self, images: list, batch: int = 16) -> torch.Tensor:
        return _embed_images(self, images, batch, lambda px: _features(self.model.get_image_features(pixel_values=px)))

    @torch.no_grad()
    def embed_text(self, prompts: list[str]) -> torch.Tensor:
        tok = self.processor(text=prompts, return_tensors="pt", padding=True, truncation=True,
                             max_length=self.model.config.text_config.max_position_embeddings)
        feats = self.model.get_text_features(input_ids=tok["input_ids"].to(self.device),
                                             attention_mask=tok["attention_mask"].to(self.device))
        return torch.nn.functional.normalize(_features(feats).float().cpu(), dim=-1)


def mean_cosine(a: torch.Tensor, b: torch.Tensor, exclude_diagonal: bool = False) -> torch.Tensor:
    """Per row of `a`: the mean cosine to all rows of `b` (inputs normalised). With
    `exclude_diagonal` (a is b), each row's similarity to itself is left out."""
    sim = a @ b.T
    if not exclude_diagonal:
        return sim.mean(1)
    n = sim.shape[0]
    if n < 2:
        raise InputError("at least two real images are needed to compare real images with each other")
    return (sim.sum(1) - sim.diagonal()) / (n - 1)


def describe_models(dino: DinoScorer | None, clip: ClipScorer | None, lpips_reason: str) -> list[str]:
    """Lines saying which metric models were used, and that random ones mean nothing."""
    lines = []
    for what, m in (("DINO", dino), ("CLIP", clip)):
        if m is None:
            lines.append(f"{what}: not computed")
        elif m.random:
            lines.append(f"{what}: {m.name} - a tiny RANDOM-initialised model: its scores mean nothing")
        else:
            lines.append(f"{what}: {m.name}")
    lines.append(f"LPIPS (DIV): {'unavailable: ' + lpips_reason if lpips_reason else 'lpips package'}")
    return lines
