"""The evaluation folder of `cascade evaluate`: one folder collects every subject evaluated into it
(call the command once per subject with the same --output), and the images kept in it are reused
only when they were made by the same setup.

- The folder is made by evaluate (marker command "evaluate") or is new; any other existing folder is
  refused (evaluate never writes into a training run or a user's folder).
- Each RUN/<subject>/<label>/ image folder records what made its images (IMAGES_RECORD): the models
  and their content (size + mtime of every file, hashed), the sampling settings, the identifier and
  class, the prompts, the seed and the images per prompt. A rerun with anything different is
  refused, naming what changed, instead of scoring the old images as the new model's.
- Subjects are keyed by their folder's name: RUN/<subject>/scores.json records which folder (its path
  and a digest of its photos), and another folder of the same name is refused (its rows would replace
  the first subject's).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

from cascade.runs import folders, markers
from stages import components
from stages.errors import InputError

IMAGES_RECORD = "cascade-images.json"
COMMAND = "evaluate"


def content(path: str) -> str | None:
    """A digest of a model folder's files (relative name, size, mtime): changes when any file does.
    None for a hub id (not a local folder)."""
    src = components.describe_source(path)
    roots = [Path(p) for p in {str(src.export) if src.export else None, src.base} if p and Path(p).is_dir()]
    if not roots:
        return None
    h = hashlib.sha256()
    for root in sorted(roots):
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(filenames):
                f = Path(dirpath) / name
                st = f.stat()
                h.update(f"{f.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:16]


def images_identity(cfg, paths, identifier: str | None, class_noun: str, templates: list[str], req) -> dict:
    """Everything the generated images of one model depend on."""
    def model(p: str):
        return "none" if p == "none" else {"path": str(Path(p).resolve()) if Path(p).exists() else p,
                                           "content": content(p)}

    return {"stage1": model(paths.stage1), "stage2": model(paths.stage2), "text_encoder": model(paths.text_encoder),
            "dtype": cfg.models.dtype, "variant": cfg.models.variant, "max_text_length": cfg.max_text_length,
            "sampling": {"stage1": dataclasses.asdict(cfg.stage1.sample),
                         "stage2": dataclasses.asdict(cfg.stage2.sample)},
            "identifier": identifier, "class_noun": class_noun,
            "prompts": hashlib.sha256("\n".join(templates).encode()).hexdigest()[:16],
            "seed": req.seed, "num_images": req.num_images, "num_class_images": req.num_class_images}


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key} {a!r} -> {b!r}")
    return out


def _has_images(folder: Path) -> bool:
    return folder.is_dir() and any(f.suffix == ".png" for f in folder.iterdir())


def check_images(folder: Path, identity: dict):
    """Refuse a folder whose kept images were made by another setup (read only)."""
    if not _has_images(folder):
        return
    record = folder / IMAGES_RECORD
    try:
        old = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise InputError(f"{folder} holds images without a record of what made them ({IMAGES_RECORD}); "
                         f"choose a new --output, or delete that folder to make them again") from None
    diffs = _differences(old, identity)
    if diffs:
        shown = "; ".join(diffs[:4]) + (f"; and {len(diffs) - 4} more" if len(diffs) > 4 else "")
        raise InputError(f"{folder} holds images made by another setup ({shown}); scoring them as this "
                         f"model's would be wrong: choose a new --output, or delete that folder to make them again")


def subject_record(subject: str) -> dict:
    """Which photos a subject's scores are of (kept in RUN/<subject>/scores.json)."""
    return {"subject_folder": str(Path(subject).resolve()), "subject_sha256": markers.folder_digest(subject)}


def check_subject(output: str | None, name: str, subject: str):
    """Refuse a second subject folder of the same name into one evaluation folder (read only)."""
    if output is None:
        return
    try:
        old = json.loads((Path(output) / name / "scores.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # no subject of this name yet (or a record from before subjects were recorded)
    new = subject_record(subject)
    if old.get("subject_folder") is None or any(old.get(k) == new[k] for k in new):
        return  # the same folder, or the same photos moved
    raise InputError(f"--subject {subject}: {output} already holds the scores of another subject folder named "
                     f"'{name}' ({old['subject_folder']}); its rows would be replaced: rename one of the folders, "
                     f"or choose another --output")


def record_images(folder: Path, identity: dict):
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (IMAGES_RECORD + ".tmp")
    tmp.write_text(json.dumps(identity, indent=1), encoding="utf-8")
    os.replace(tmp, folder / IMAGES_RECORD)


def check_folder(output: str | None):
    """Before anything is loaded: an existing --output must be an evaluation folder (or empty)."""
    if output is None:
        return
    path = Path(output)
    if path.exists() and not path.is_dir():
        raise InputError(f"--output {path} is a file, not a folder")
    if not path.is_dir() or not any(path.iterdir()):
        return
    if not markers.is_run_folder(path):
        raise InputError(f"--output {path} exists and is not a cascade run folder; choose a new --output "
                         f"(evaluate adds subjects only to evaluation folders it made)")
    made_by = markers.read_marker(path).get("command")
    if made_by != COMMAND:
        raise InputError(f"--output {path} is a cascade {made_by or 'unknown'} folder, not an evaluation folder; "
                         f"choose a new --output (evaluate adds subjects only to evaluation folders it made)")


def open_folder(output: str | None, subject_name: str) -> Path:
    """The evaluation folder, continued when it is one (any subject), else made new."""
    check_folder(output)
    path = Path(output) if output is not None else None
    if path is not None and path.is_dir() and any(path.iterdir()):
        try:
            markers.acquire(path)
        except OSError as e:
            raise InputError(f"cannot write to output folder {path}: {e.strerror or e}") from None
        return path
    return folders.prepare_output(output, f"eval-{subject_name}", identity={"command": COMMAND})
