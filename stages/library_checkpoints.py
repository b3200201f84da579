"""The folders of a checkpoint that an engine reads itself, checked before it does.

Both sharded engines unpickle with code allowed: FSDP's folders (torch.distributed.checkpoint) read
`.metadata` with plain pickle and every non-tensor entry (an optimizer's lr, step) with torch's loader
in its unrestricted mode; DeepSpeed's engine reads its `*_states.pt` in that mode too.
Here each is read first with an unpickler that admits only the plain-data classes these libraries write
(their metadata dataclasses, DeepSpeed's loss scaler and stage enum); a file that names anything else is
refused before the library opens it. Tensors inside `.distcp` files are read by torch with weights_only."""
from __future__ import annotations

import io
import pickle
from pathlib import Path


def _dcp_classes() -> dict[tuple[str, str], object]:
    import collections
    import pathlib

    import torch
    from torch.distributed.checkpoint import filesystem, metadata as m

    classes = [m.Metadata, m.TensorStorageMetadata, m.BytesStorageMetadata, m.ChunkStorageMetadata,
               m.TensorProperties, m.MetadataIndex, m.StorageMeta, m._MEM_FORMAT_ENCODING, filesystem._StorageInfo,
               pathlib.PosixPath, pathlib.PurePosixPath, collections.OrderedDict, torch.Size]
    out = {(c.__module__, c.__qualname__): c for c in classes}
    out[("torch.serialization", "_get_layout")] = torch.serialization._get_layout  # looks a layout up by name
    out.update({("torch", str(d).split(".")[1]): d for d in
                (getattr(torch, n) for n in dir(torch)) if isinstance(d, torch.dtype)})
    return out


class _PlainData(pickle.Unpickler):
    """An unpickler whose globals are a fixed table: a class outside it is refused, never imported."""

    def __init__(self, file, allowed: dict):
        super().__init__(file)
        self.allowed = allowed

    def find_class(self, module, name):
        if (module, name) not in self.allowed:
            raise pickle.UnpicklingError(f"it calls {module}.{name}")
        return self.allowed[(module, name)]


def _weights_only(data, what: str, extra: list = ()) -> str | None:
    import torch

    try:
        with torch.serialization.safe_globals(list(extra)):
            source, mmap = (data, True) if isinstance(data, Path) else (io.BytesIO(data), False)
            torch.load(source, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        found = str(e).split("GLOBAL ", 1)[1].split(" ", 1)[0] if "GLOBAL " in str(e) else "objects"
        return f"{what} holds pickled objects, not plain data, and is never unpickled (it calls {found})"
    except (OSError, EOFError, RuntimeError, ValueError) as e:
        return f"{what} cannot be read as a torch file ({e.__class__.__name__})"
    return None


def dcp_refusal(folder: Path) -> str | None:
    """Why torch.distributed.checkpoint may not load `folder` (None: only plain data in it)."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata

    try:
        with open(folder / ".metadata", "rb") as f:
            md = _PlainData(f, _dcp_classes()).load()
    except pickle.UnpicklingError as e:
        return f"{folder.name}/.metadata is never unpickled ({e})"
    except (OSError, EOFError, ValueError, TypeError, AttributeError) as e:
        return f"{folder.name}/.metadata cannot be read ({e.__class__.__name__})"
    if not isinstance(md, Metadata):
        return f"{folder.name}/.metadata is not a checkpoint's metadata"
    for index, info in md.storage_data.items():
        if not isinstance(md.state_dict_metadata.get(index.fqn), BytesStorageMetadata):
            continue  # tensors: read by torch with weights_only=True
        if info.transform_descriptors:
            return f"{folder.name}: entry {index.fqn} is stored transformed and cannot be checked"
        try:
            with open(folder / Path(info.relative_path).name, "rb") as f:
                f.seek(info.offset)
                data = f.read(info.length)
        except OSError as e:
            return f"{folder.name}: entry {index.fqn} cannot be read ({e.__class__.__name__})"
        if (reason := _weights_only(data, f"{folder.name}: entry {index.fqn}")) is not None:
            return reason
    return None


def deepspeed_refusal(f: Path) -> str | None:
    """Why DeepSpeed may not load `f` (a ZeRO `*_states.pt`): weights-only plus its own plain classes."""
    extra = []
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum

        extra = [LossScaler, DynamicLossScaler, ZeroStageEnum]
    except ImportError:  # without DeepSpeed nothing can load the folder; the check still runs
        pass
    return _weights_only(f, f"{f.parent.name}/{f.name}", extra)


def folder_refusal(folder: Path) -> str | None:
    """A checkpoint's subfolder: FSDP's (it holds `.metadata`) or DeepSpeed's (`*.pt` files)."""
    if (folder / ".metadata").is_file():
        return dcp_refusal(folder)
    for f in sorted(folder.rglob("*")):
        if f.is_file() and f.suffix in (".pt", ".bin", ".pkl", ".pth") and (reason := deepspeed_refusal(f)):
            return reason
    return None
