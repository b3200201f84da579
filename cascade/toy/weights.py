"""The committed toy cascade (package data under cascade/toy/weights/), checked against its sha256 list.

`weights/SHA256SUMS` lists every file of stage1/ and stage2/ with its digest (sha256sum format);
loading refuses a folder whose files differ, naming the file, so a damaged or edited copy is never
mistaken for the pretrained model.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from stages.errors import InputError

WEIGHTS = Path(__file__).with_name("weights")
SUMS = "SHA256SUMS"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def model_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != SUMS and "__pycache__" not in p.parts)


def write_sums(root: Path) -> str:
    """Write root/SHA256SUMS; returns the digest of that list (one number for the README)."""
    lines = "".join(f"{sha256(p)}  {p.relative_to(root).as_posix()}\n" for p in model_files(root))
    (root / SUMS).write_text(lines)
    return hashlib.sha256(lines.encode()).hexdigest()


def verify(root: Path = WEIGHTS) -> Path:
    """Check every listed file (and that no listed file is missing); return root."""
    sums = root / SUMS
    if not sums.is_file():
        raise InputError(f"{sums} is missing: the toy weights cannot be checked")
    for line in sums.read_text().splitlines():
        digest, name = line.split("  ", 1)
        f = root / name
        if not f.is_file():
            raise InputError(f"toy weights: {f} is missing")
        if sha256(f) != digest:
            raise InputError(f"toy weights: {f} does not match its sha256 in {sums} (damaged or modified file)")
    return root


def toy_root() -> Path:
    """The committed, checksum-verified toy cascade: stage1/ (IFPipeline) and stage2/ (IFSuperResolutionPipeline)."""
    return verify(WEIGHTS)


def install(model_dir: Path, provenance: dict, dest: Path) -> str:
    """Copy a pretraining's model/ (stage1/, stage2/) into `dest` with the UNets in fp16, write
    PROVENANCE.json and SHA256SUMS; returns the digest of the sums list. Built beside `dest` and
    renamed into place, so a failure leaves `dest` as it was (`cascade toy install` decides whether
    `dest` may be replaced: the packaged weights only with --replace-packaged)."""
    import json
    import os
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    dest = Path(dest)
    tmp, old = dest.with_name(dest.name + ".tmp"), dest.with_name(dest.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for stage in ("stage1", "stage2"):
            shutil.copytree(Path(model_dir) / stage, tmp / stage)
            f = tmp / stage / "unet" / "diffusion_pytorch_model.safetensors"
            save_file({k: v.to(torch.float16) for k, v in load_file(f).items()}, str(f), metadata={"format": "pt"})
        (tmp / "PROVENANCE.json").write_text(json.dumps(provenance, indent=1) + "\n")
        digest = write_sums(tmp)
        if dest.exists():
            os.replace(dest, old)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return digest


def _source():
    from cascade.model_sources import Source

    return Source(root=lambda cache_dir: toy_root(), marker=WEIGHTS.name, random_weights=False)


SOURCE = _source()  # `models.stageN: toy` (entry point cascade.model_sources:toy); cache_dir unused
