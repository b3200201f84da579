"""Before any model loads: is every model a command needs actually loadable?

- A hub id must be in the local Hugging Face cache, or the hub must answer within a few seconds;
  otherwise one line says so (instead of ~30 s of retries, repeated hub warnings and "does not
  appear to have a file named config.json").
- `models.variant` (e.g. fp16) must exist in a local folder: diffusers and transformers fail with a
  traceback when the variant's weight files are missing.
- A model folder never runs its own code: a config that asks for it (`auto_map`, `trust_remote_code`,
  a `tokenizer_class` transformers does not have) is refused in one line, before transformers could
  offer to run it ("Do you wish to run the custom code? [y/N]") or fail with a traceback.
"""
from __future__ import annotations

import os
from pathlib import Path

from cascade.models import ModelPaths
from stages.components import describe_source
from stages.errors import InputError

PROBE_TIMEOUT_S = 3.0
WEIGHT_SUFFIXES = (".safetensors", ".bin")


class ModelUnavailableError(InputError):
    """A model that cannot be loaded here: not cached and no hub, or missing variant files."""


def hub_offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    return constants.HF_HUB_OFFLINE or flag in ("1", "ON", "YES", "TRUE")


def _has_weights(folder: Path, variant: str | None) -> bool:
    """A weight file (single or sharded) in `folder`, of the variant when one is asked for."""
    if not folder.is_dir():
        return False
    names = [p.name for p in folder.iterdir() if p.name.endswith(WEIGHT_SUFFIXES)]
    return any(variant is None or f".{variant}." in n or f".{variant}-" in n for n in names)


def _cached(repo: str, sub: str, variant: str | None, config_name: str) -> bool:
    """Config and weights of `repo/sub` are in the local hub cache (no network involved)."""
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(repo, f"{sub}/{config_name}")
    return isinstance(config, str) and (sub == "tokenizer" or _has_weights(Path(config).parent, variant))


def _probe(repo: str, sub: str, config_name: str) -> str | None:
    """None when the hub serves `repo/sub/config.json` (`repo/config.json` for sub ""); else why not."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, HfHubHTTPError,
                                        RepositoryNotFoundError)

    from huggingface_hub import constants

    endpoint = os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
    try:
        get_hf_file_metadata(hf_hub_url(repo, f"{sub}/{config_name}".lstrip("/"), endpoint=endpoint),
                             timeout=PROBE_TIMEOUT_S, endpoint=endpoint)
    except GatedRepoError:
        raise ModelUnavailableError(f"model {repo} is gated: accept its license on https://huggingface.co/{repo} "
                                    f"and log in (`hf auth login`)") from None
    except RepositoryNotFoundError:
        raise ModelUnavailableError(f"model {repo} is not on the Hugging Face hub (or is private)") from None
    except EntryNotFoundError:
        raise ModelUnavailableError(f"model {repo} has no {f'{sub}/{config_name}'.lstrip('/')}: not a model of this "
                                    f"kind") from None
    except HfHubHTTPError:
        return None  # the hub answered; let from_pretrained report the details
    except Exception as e:  # noqa: BLE001 - connection refused, DNS failure, timeout, proxy errors
        return " ".join(f"{e.__class__.__name__}: {e}".split())[:160]
    return None


CODE_KEYS = ("auto_map", "trust_remote_code", "custom_pipeline")  # config keys that name Python code to run
_CONFIGS = ("config.json", "tokenizer_config.json", "model_index.json", "preprocessor_config.json",
            "processor_config.json", "scheduler_config.json")


def _asks_for_code(config: Path) -> str | None:
    """What in `config` would make transformers/diffusers import code from the model folder, or None."""
    import json

    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None  # unreadable configs are reported by the loaders; nothing of them runs
    if not isinstance(data, dict):
        return None
    keys = [k for k in CODE_KEYS if data.get(k)]
    if keys:
        return keys[0]
    cls = data.get("tokenizer_class")
    if config.name == "tokenizer_config.json" and isinstance(cls, str):
        import transformers

        if not hasattr(transformers, cls) and not hasattr(transformers, cls + "Fast"):
            return f"tokenizer_class {cls}"
    return None


def refuse_custom_code(folder: str | Path, setting: str):
    """Refuse a model folder (its configs and those of its component subfolders) that asks to run
    its own code: cascade never offers remote code."""
    root = Path(folder)
    if not root.is_dir():
        return
    for name in _CONFIGS:
        for config in [root / name, *sorted(root.glob(f"*/{name}"))]:
            if config.is_file() and (what := _asks_for_code(config)) is not None:
                raise InputError(f"{setting} ({folder}): {config.relative_to(root)} asks to run the folder's own "
                                 f"code ({what}); cascade never runs code from a model folder: use a folder "
                                 f"without custom code")


def check_source(name: str, sub: str, setting: str, variant: str | None):
    """`name` (hub id or folder; exports are checked through their base) can be loaded and runs no
    code of its own."""
    src = describe_source(name)
    for folder in (src.export, src.base):
        if folder is not None:
            refuse_custom_code(folder, setting)
    if src.kind == "full" and sub == "unet":
        return  # the export's own weights, loaded without a variant
    base = Path(src.base)
    if base.exists():
        if variant and (base / sub).is_dir() and not _has_weights(base / sub, variant):
            raise ModelUnavailableError(
                f"models.variant={variant}: {base / sub} has no {variant} weight files; set models.variant=null "
                f"for this local folder (or point {setting} at a folder with {variant} weights)")
        return
    repo = src.base
    config_name = "tokenizer_config.json" if sub == "tokenizer" else "config.json"
    if _cached(repo, sub, variant, config_name):
        from huggingface_hub import try_to_load_from_cache

        refuse_custom_code(Path(try_to_load_from_cache(repo, f"{sub}/{config_name}")).parents[1], setting)
        return
    _reachable(repo, sub, config_name, setting)


def _reachable(repo: str, sub: str, config_name: str, setting: str):
    """One probe of the hub (PROBE_TIMEOUT_S), or one line saying why the model cannot be fetched."""
    reason = "HF_HUB_OFFLINE is set" if hub_offline() else _probe(repo, sub, config_name)
    if reason is None:
        return
    from huggingface_hub import constants

    raise ModelUnavailableError(
        f"model {repo} ({setting}) is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and the hub "
        f"cannot be reached ({reason}); download it where there is network (`hf download {repo}`) into this cache, "
        f"unset HF_HUB_OFFLINE if you are online, or point {setting} at a local folder")


def check_hub_model(repo: str, setting: str):
    """A hub id that is not in the local cache (a model with config.json at its top, e.g. the DINO and
    CLIP metric models): one quick probe instead of the libraries' minutes of retries."""
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(repo, "config.json"), str):
        return
    _reachable(repo, "", "config.json", setting)


def check_models(paths: ModelPaths, variant: str | None, stages=(1, 2)):
    """Every model a command will load, checked before any of them loads."""
    for stage in stages:
        name = {1: paths.stage1, 2: paths.stage2, 3: paths.stage3}[stage]
        if name != "none":
            check_source(name, "unet", f"models.stage{stage}", None if stage == 3 else variant)
    if 3 in stages and paths.stage3 != "none":  # loaded as a whole pipeline: its model_index.json names classes
        check_pipeline_classes(paths.stage3, "models.stage3")
    check_source(paths.text_encoder, "text_encoder", "models.text_encoder", variant)


def check_trainable(name: str, stage: int):
    """Fine-tuning starts from base weights or a full export; a LoRA export is refused (its adapter
    would be trained as if it were the whole model and exported under peft key names)."""
    src = describe_source(name)
    if src.kind == "lora":
        raise InputError(f"models.stage{stage} ({name}) is a LoRA export; training on top of a LoRA adapter is "
                         f"not supported: train from its base model ({src.base}) or from a full export")


def subject_record(subject: str) -> dict:
    """What an export was trained on, for its cascade.json: the photo folder's name and a digest of
    its files (names and sizes), so two exports of one identifier can be told apart."""
    import hashlib

    folder = Path(subject)
    files = sorted((p.name, p.stat().st_size) for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
    digest = hashlib.sha256(repr(files).encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return {"subject": folder.resolve().name, "subject_files": digest}  # no local path: push uploads it


_WARNED: set = set()


def check_same_subject(stage1: str, stage2: str) -> list[str]:
    """Stage I and stage II exports that share an identifier but were trained on different subjects
    or classes: a warning each (the samples would mix two subjects); the differences are returned."""
    import logging

    m1, m2 = (describe_source(p).meta or {} for p in (stage1, stage2))
    if not (m1.get("identifier") and m1.get("identifier") == m2.get("identifier")):
        return []
    diffs = [f"{key.replace('_', ' ')} {m1[key]!r} vs {m2[key]!r}" for key in ("class_noun", "subject", "subject_files")
             if m1.get(key) is not None and m2.get(key) is not None and m1[key] != m2[key]]
    if diffs and (stage1, stage2) not in _WARNED:
        _WARNED.add((stage1, stage2))  # once per command, though sampling checks twice
        logging.getLogger(__name__).warning(
            "stage I export %s and stage II export %s share the identifier %r but were trained on different "
            "subjects (%s): the samples mix two subjects; use the stage II export of the same subject",
            stage1, stage2, m1["identifier"], "; ".join(diffs))
    return diffs


LIBRARIES = ("diffusers", "transformers")


def check_pipeline_classes(name: str, setting: str):
    """A pipeline loaded whole (stage III) builds each component from the library and class its
    model_index.json names; a module of the model folder there would be code from the folder (diffusers
    asks for trust_remote_code only after stages I and II have run). Every component must be a class of
    diffusers or transformers (or [null, null], an absent one)."""
    import importlib
    import json

    from huggingface_hub import try_to_load_from_cache

    base = Path(describe_source(name).base)
    index = base / "model_index.json" if base.exists() else try_to_load_from_cache(str(base), "model_index.json")
    if not isinstance(index, (str, Path)) or not Path(index).is_file():
        return  # a hub model not cached yet: check_source has said whether it can be fetched
    try:
        entries = json.loads(Path(index).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise ModelUnavailableError(f"{setting} ({name}): its model_index.json is not readable JSON") from None
    named = [(key, (value + [None, None])[:2]) for key, value in (entries.items() if isinstance(entries, dict) else ())
             if not key.startswith("_") and isinstance(value, list) and value != [None, None]]
    # the libraries first (no import), then the classes (importing a library's class loads its module)
    for _, (lib, cls) in sorted(named, key=lambda kv: kv[1][0] in LIBRARIES):
        if lib not in LIBRARIES or not isinstance(cls, str) or not hasattr(importlib.import_module(lib), cls):
            raise ModelUnavailableError(
                f"{setting} ({name}): its model_index.json names a component class that is not one of "
                f"{' or '.join(LIBRARIES)} (custom code of the folder); cascade never runs code from a model folder")
