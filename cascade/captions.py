"""Per-image captions for a training folder: opt-in (DreamBooth's default is the one prompt
"a [V] <class>"), in the two layouts other trainers read:

- `sidecar`: a `<image stem>.txt` beside each image, as kohya-ss sd-scripts read captions
  (`dog1.png` -> `dog1.txt`; the whole file, stripped, line breaks read as spaces);
- `metadata`: one `metadata.jsonl` in the folder, a JSON object per line with `file_name` and
  `text`, the Hugging Face ImageFolder layout that diffusers' text-to-image trainers read.

Every image of the folder needs a non-empty caption. "[V]" in a caption is replaced by the subject's
identifier. Any fault is one InputError naming the file (and line) before any model loads.
A caption file must lie in the folder (a symlink pointing out of it is refused, never read) and be
small: a sidecar at most MAX_CAPTION_BYTES, metadata.jsonl at most that per image.
"""
from __future__ import annotations

import json
from pathlib import Path

from stages import data
from stages.errors import InputError

MODES = ("none", "sidecar", "metadata")
METADATA = "metadata.jsonl"
MAX_CAPTION_BYTES = 4096  # T5 reads 77-128 tokens: a caption is a sentence, never kilobytes


class CaptionError(InputError):
    """A missing, empty or unreadable caption; the message names the file."""


def _read_text(path: Path, folder: Path, limit: int = MAX_CAPTION_BYTES) -> str:
    """The file's text: only a regular file inside `folder` (symlinks resolved), at most `limit` bytes."""
    try:
        real = path.resolve(strict=True)
        if folder.resolve() not in real.parents:
            raise CaptionError(f"caption file {path} points outside the folder {folder} (to {real}); captions are "
                               f"read only from files inside it")
        if not real.is_file():
            raise CaptionError(f"caption file {path} is not a regular file")
        with open(real, "rb") as f:
            raw = f.read(limit + 1)
        if len(raw) > limit:
            raise CaptionError(f"caption file {path} is larger than {limit} bytes ({real.stat().st_size}); a caption "
                               f"is one sentence")
        return raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CaptionError(f"caption file {path} cannot be read ({e.__class__.__name__}: {e})") from None


def _sidecar(folder: Path, images: list[Path]) -> list[str]:
    out = []
    for img in images:
        txt = img.with_suffix(".txt")
        if not txt.is_file():
            raise CaptionError(f"caption file {txt} missing for image {img} (captions: sidecar needs one per image)")
        caption = " ".join(_read_text(txt, folder).split())
        if not caption:
            raise CaptionError(f"caption file {txt} is empty")
        out.append(caption)
    return out


def _metadata(folder: Path, images: list[Path]) -> list[str]:
    meta = folder / METADATA
    if not meta.is_file():
        raise CaptionError(f"{meta} not found (captions: metadata needs one line per image: "
                           f'{{"file_name": "a.png", "text": "..."}})')
    names = {p.name for p in images}
    found: dict[str, str] = {}
    limit = MAX_CAPTION_BYTES * max(len(images), 1)
    for n, line in enumerate(_read_text(meta, folder, limit).splitlines(), 1):
        if not line.strip():
            continue
        where = f"{meta} line {n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise CaptionError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str) or "text" not in row:
            raise CaptionError(f'{where}: expected an object with "file_name" and "text"')
        name = Path(row["file_name"]).as_posix().removeprefix("./")
        if name not in names:
            raise CaptionError(f"{where}: {row['file_name']!r} is not an image of {folder}")
        if name in found:
            raise CaptionError(f"{where}: second caption for {name}")
        caption = " ".join(str(row["text"] or "").split())
        if not caption:
            raise CaptionError(f"{where}: empty caption for {name}")
        if len(caption.encode()) > MAX_CAPTION_BYTES:
            raise CaptionError(f"{where}: the caption for {name} is longer than {MAX_CAPTION_BYTES} bytes")
        found[name] = caption
    missing = [p.name for p in images if p.name not in found]
    if missing:
        raise CaptionError(f"{meta} has no caption for {len(missing)} image(s): {', '.join(missing[:5])}")
    return [found[p.name] for p in images]


def read_captions(folder: str | Path, mode: str, identifier: str) -> list[str] | None:
    """One caption per image of `folder`, in `data.list_images` order; None when `mode` is "none"."""
    if mode == "none":
        return None
    if mode not in MODES:
        raise CaptionError(f"captions: {mode!r} is not one of {', '.join(MODES)}")
    folder = Path(folder)
    images = data.list_images(folder)
    captions = _sidecar(folder, images) if mode == "sidecar" else _metadata(folder, images)
    return [c.replace("[V]", identifier) for c in captions]
