"""Checkpoints (atomic, resumable) and exports that plain diffusers pipelines load.

A checkpoint is accelerate's full training state (model, optimizer, LR schedule, RNG) plus our
`trainer_state.json` (step, loss history) and, with train.ema, `ema.safetensors` + `ema.json`, written
to `checkpoint-NNNNNN.tmp` and renamed when complete, so a killed run never leaves a half-written
checkpoint that resume would pick up. Before a resume loads anything, every file of the checkpoint is
checked in its own format (JSON, safetensors, torch's weights-only unpickler): a file that would run
code, or is not what its name says, is refused in one line.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from pathlib import Path

from stages import engines
from stages.components import EXPORT_META, LORA_WEIGHTS
from stages.errors import InputError, writing

STATE_FILE = "trainer_state.json"
_CKPT = re.compile(r"^checkpoint-(\d+)$")


def checkpoints(folder: Path) -> list[tuple[int, Path]]:
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _CKPT.match(p.name)) and
             (p / STATE_FILE).is_file()]
    return sorted(found)


def latest_checkpoint(folder: Path) -> Path | None:
    found = checkpoints(folder)
    return found[-1][1] if found else None


def save_checkpoint(accelerator, folder: Path, step: int, state: dict, keep: int, ema=None) -> Path:
    """Collective: every process calls it (accelerate gathers sharded states); the main process writes
    the temp folder (and the EMA, identical on every rank), then renames it into place and prunes old
    checkpoints."""
    final = folder / f"checkpoint-{step:06d}"
    tmp = folder / f"checkpoint-{step:06d}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    with writing(tmp):  # a full disk inside torch/safetensors names no file
        accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()  # every rank writes into tmp (its RNG state, its shards) before the rename
    if accelerator.is_main_process:
        with writing(tmp / STATE_FILE):
            (tmp / STATE_FILE).write_text(json.dumps(state))
        if ema is not None:
            with writing(tmp):
                ema.save(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for _, old in checkpoints(folder)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _unpickle_refusal(e: Exception) -> str:
    """What torch's weights-only loader refused, in a few words (its message is a paragraph)."""
    m = re.search(r"GLOBAL ([\w.]+)", str(e))
    if m:
        return f"it calls {m.group(1)}"
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[-1][:200] if lines else e.__class__.__name__


def safe_load(path: Path, what: str = "checkpoint"):
    """`torch.load` that never runs code from the file: weights_only (tensors, numbers, strings and
    containers of them). A file that needs more is refused in one line, before anything of it runs."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise InputError(f"{what} {path} holds more than tensors and numbers and is refused (loading it would run "
                         f"code from the file: {_unpickle_refusal(e)})") from None
    except (OSError, EOFError, RuntimeError, ValueError) as e:
        raise InputError(f"{what} {path} cannot be read ({e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                         ) from None


_PICKLED = (".bin", ".pkl", ".pt", ".pth")  # what accelerate writes with torch.save


def _file_refusal(f: Path) -> str | None:
    """Why `f` may not be loaded (None: it is what its name says, and loading it runs no code)."""
    if f.suffix == ".json":
        try:
            json.loads(f.read_text())
        except (ValueError, UnicodeDecodeError):
            return "is not JSON"
    elif f.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(f), "pt") as sf:
                sf.keys()
        except Exception:  # safetensors raises its own error types for any malformed header
            return "is not a safetensors file"
    elif f.suffix in _PICKLED:
        from accelerate.utils import load  # weights-only, with accelerate's allow-list (numpy RNG states)

        try:
            load(str(f), map_location="cpu", mmap=True)  # mmap: the tensors are not read, only checked
        except pickle.UnpicklingError as e:
            return f"holds pickled objects, not plain tensors, and is never unpickled ({_unpickle_refusal(e)})"
        except (OSError, EOFError, RuntimeError, ValueError) as e:
            return f"cannot be read as a torch file ({e.__class__.__name__})"
    return None


def check_files(path: Path):
    """Every file of checkpoint `path`, checked before any is loaded: accelerate swallows a refused RNG
    state, and a library loader may unpickle (the engines' subfolders: `library_checkpoints`); one line
    names the first bad file."""
    from stages.library_checkpoints import folder_refusal  # the engines' own folders (FSDP, DeepSpeed)

    for f in sorted(Path(path).iterdir()):
        reason = (f"{f.name} {r}" if (r := _file_refusal(f)) else None) if f.is_file() else folder_refusal(f)
        if reason is not None:
            raise InputError(f"checkpoint {path} was refused: {reason}; resume from another checkpoint "
                             f"or start a new --output")


def load_checkpoint(accelerator, path: Path, ema=None) -> dict:
    """accelerate's loader reads with weights_only (never unpickles code); a refused file is one line.
    Every file is checked first (`check_files`); the EMA is ours (`TrainingEMA.load`)."""
    check_files(path)
    try:
        accelerator.load_state(str(path))
    except pickle.UnpicklingError as e:  # torch.load(weights_only=True) refused a file: name the checkpoint
        while isinstance(e.__cause__ or e.__context__, pickle.UnpicklingError):
            e = e.__cause__ or e.__context__  # the innermost says what was refused
        reason = " ".join((str(e).strip().splitlines() or [""])[0].split())[:160]
        raise InputError(f"checkpoint {path} was refused: a file in it holds pickled objects, not plain tensors, "
                         f"and is never unpickled ({reason}); resume from another checkpoint or start a new "
                         f"--output") from None
    if ema is not None:
        ema.load(path)
    return json.loads((path / STATE_FILE).read_text())


def lora_metadata(lora_config) -> dict:
    """peft's config as a dict with sets (target_modules) sorted: diffusers writes a set in hash
    order, which changes per process, so identical runs would get different bytes and digests."""
    return {k: sorted(v) if isinstance(v, (set, frozenset)) else v for k, v in lora_config.to_dict().items()}


def canonical_safetensors(path: Path):
    """Rewrite a safetensors header with its keys sorted: safetensors writes the metadata map in
    hash order, which changes from save to save, so identical weights would get different bytes."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.dumps(json.loads(raw[8:8 + n]), sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    header += b" " * (-len(header) % 8)  # the format allows trailing spaces; keeps the data 8-byte aligned
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(len(header).to_bytes(8, "little") + header + raw[8 + n:])
    os.replace(tmp, path)


def record_base_portably(folder: Path, base: str):
    """diffusers writes the local folder a model was loaded from into its config (`_name_or_path`); an
    upload would carry that path: the export's configs name the base as cascade.json does."""
    for f in folder.rglob("*.json"):
        data = json.loads(f.read_text())
        if isinstance(data, dict) and "_name_or_path" in data:
            f.write_text(json.dumps({**data, "_name_or_path": base}, indent=2, sort_keys=True) + "\n")


def readable_like_others(folder: Path):
    """safetensors writes through a private temp file (mode 0600); give every exported file the
    mode an ordinary file gets here (0644 under the usual umask 022)."""
    umask = os.umask(0)
    os.umask(umask)
    for f in folder.rglob("*"):
        if f.is_file():
            os.chmod(f, 0o666 & ~umask)


def export(unet, accelerator, scheduler, out: Path, *args, **kwargs):
    """`_export`, with a failure (a full disk) naming the folder it was writing."""
    with writing(out.with_name(out.name + ".tmp")):
        return _export(unet, accelerator, scheduler, out, *args, **kwargs)


def _export(unet, accelerator, scheduler, out: Path, meta: dict, lora_config=None, save_fixed_small: bool = False,
            variant: str = "none"):
    """Write `out/` atomically: full fine-tunes as `unet/` + `scheduler/` (UNet2DConditionModel and
    DDPMScheduler `from_pretrained` load them, and `IFPipeline.from_pretrained(base, unet=...)`
    takes them), LoRA as diffusers LoRA weights for `pipe.load_lora_weights(out)`.

    The LoRA state dict is saved with peft's key names as they are: converting it to the old
    diffusers `lora.down/up` names first makes diffusers 0.42 load only the add_k/add_v adapters of
    IF's attention and silently drop to_q/to_k/to_v/to_out."""
    tmp = out.with_name(out.name + ".tmp")
    state_dict = engines.with_fp32_masters(accelerator, unet, accelerator.get_state_dict(unet))  # collective
    if not accelerator.is_main_process:
        return None
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model = accelerator.unwrap_model(unet)
    if lora_config is not None:
        from diffusers import IFPipeline
        from peft.utils import get_peft_model_state_dict

        lora_sd = get_peft_model_state_dict(model, state_dict=state_dict)
        IFPipeline.save_lora_weights(tmp, unet_lora_layers=lora_sd, weight_name=LORA_WEIGHTS,
                                     unet_lora_adapter_metadata=lora_metadata(lora_config))
        canonical_safetensors(tmp / LORA_WEIGHTS)
        kind = "lora"
    else:
        engines.save_full_unet(accelerator, unet, state_dict, tmp / "unet")  # gathered weights, one form
        kind = "full"
        if variant != "none":  # IF's own layout: half-precision weights in diffusion_pytorch_model.<variant>.*
            from stages.optimizers.low_precision import convert_to_variant

            convert_to_variant(tmp / "unet", variant)
            meta = {**meta, "variant": variant}
    if save_fixed_small:
        # epsilon-only training leaves the variance channels untrained: sample with beta~ instead
        scheduler = scheduler.__class__.from_config(scheduler.config, variance_type="fixed_small")
    scheduler.save_pretrained(tmp / "scheduler")
    (tmp / EXPORT_META).write_text(json.dumps({**meta, "kind": kind}, indent=2, default=str))
    record_base_portably(tmp, str(meta.get("base", "")))
    readable_like_others(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out
