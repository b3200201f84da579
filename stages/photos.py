"""Reading real-world photos: which files of a folder are images, and how one becomes plain 8-bit RGB.

Any format PIL reads counts (tif, gif, webp, heif plugins...), not a suffix list. Hidden files
(dotfiles, macOS `._x.jpg` AppleDouble forks) and the temporary files of an interrupted atomic
write (`name.tmp.png`, `name.tmp`) are skipped with a note; FIFOs, sockets and devices
are skipped without being opened (opening a FIFO blocks forever). A photo is turned upright by its
EXIF orientation, 16-bit data is scaled (not clipped) to 8 bits, and transparency is composited on
white, as a cut-out product photo would be shown.
"""
from __future__ import annotations

import logging
import stat
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from stages import png16

log = logging.getLogger(__name__)

BACKGROUND = (255, 255, 255)  # what transparent pixels become
CLASS_MANIFEST = "cascade-class.json"  # written beside generated class images; never an image
READ_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
              5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}  # EXIF orientation -> the transpose that makes the image upright


@dataclass
class FolderScan:
    images: list[Path] = field(default_factory=list)
    hidden: list[Path] = field(default_factory=list)
    not_regular: list[Path] = field(default_factory=list)
    not_images: list[Path] = field(default_factory=list)
    temporary: list[Path] = field(default_factory=list)

    def log_skipped(self, what: str):
        def names(ps):
            return ", ".join(p.name for p in ps[:8]) + (f" and {len(ps) - 8} more" if len(ps) > 8 else "")

        if self.hidden:
            log.info("%s folder: skipped %d hidden file(s): %s", what, len(self.hidden), names(self.hidden))
        if self.temporary:
            log.info("%s folder: skipped %d temporary file(s) of an interrupted write: %s", what,
                     len(self.temporary), names(self.temporary))
        if self.not_regular:
            log.warning("%s folder: skipped %d entr(ies) that are not regular files (FIFO, socket, device): %s",
                        what, len(self.not_regular), names(self.not_regular))
        if self.not_images:
            log.info("%s folder: skipped %d file(s) PIL does not recognise as images: %s", what,
                     len(self.not_images), names(self.not_images))


def is_temporary(path: Path) -> bool:
    """A file an atomic write (temp + rename) left behind when it was killed: never an image."""
    parts = path.name.lower().split(".")
    return len(parts) > 1 and "tmp" in parts[1:]


def _known_suffixes() -> set[str]:
    Image.init()
    return {s.lower() for s in Image.registered_extensions()}


def _is_image(path: Path) -> bool:
    """Header check for a file whose suffix PIL does not claim (e.g. a JPEG without extension)."""
    try:
        with Image.open(path):
            return True
    except READ_ERRORS:
        return False


def scan_folder(folder: Path) -> FolderScan:
    """Sort a folder's entries into images (by suffix PIL knows, or by header), hidden files,
    non-regular files and other files. Subfolders are ignored; nothing non-regular is opened."""
    scan, known = FolderScan(), _known_suffixes()
    for p in sorted(Path(folder).iterdir()):
        if p.name.startswith("."):
            scan.hidden.append(p)
            continue
        if is_temporary(p):
            scan.temporary.append(p)
            continue
        try:
            mode = p.stat().st_mode
        except OSError:  # a broken symlink: report it as a bad image rather than hide it
            scan.images.append(p)
            continue
        if stat.S_ISDIR(mode) or p.name == CLASS_MANIFEST:
            continue
        if not stat.S_ISREG(mode):
            scan.not_regular.append(p)
        elif p.suffix.lower() in known or _is_image(p):
            scan.images.append(p)
        else:
            scan.not_images.append(p)
    return scan


def _to_8bit(im: Image.Image) -> Image.Image:
    """16-bit / 32-bit greyscale to 8-bit "L" by scaling; PIL's own convert clips at 255."""
    a = np.asarray(im).astype(np.float64)
    if im.mode in _SIXTEEN_BIT:
        a = a / 257.0
    else:  # "I" (32-bit int) or "F": 8-bit values stay, 16-bit range is scaled, anything else stretched
        lo, hi = float(a.min()), float(a.max())
        if im.mode == "F" and lo >= 0 and hi <= 1:
            a = a * 255.0
        elif lo < 0 or hi > 65535:
            a = (a - lo) / max(hi - lo, 1e-12) * 255.0
        elif hi > 255:
            a = a / 257.0
    return Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8), mode="L")


def _flatten_alpha(im: Image.Image) -> tuple[Image.Image, bool]:
    """(image without alpha, whether any pixel was transparent)."""
    if im.mode in ("P", "L", "RGB") and "transparency" in im.info or im.mode in ("LA", "La", "PA", "RGBa"):
        im = im.convert("RGBA")
    if im.mode != "RGBA":
        return im, False
    if im.getchannel("A").getextrema()[0] == 255:
        return im, False
    bg = Image.new("RGBA", im.size, BACKGROUND + (255,))
    return Image.alpha_composite(bg, im).convert("RGB"), True


def open_photo(path: Path, what: str = "subject") -> Image.Image:
    """The photo as 8-bit RGB, upright. Raises one of READ_ERRORS when PIL cannot decode it."""
    with Image.open(path) as im:
        frames = getattr(im, "n_frames", 1)
        im.load()
        orientation = im.getexif().get(0x0112, 1)
        source_mode = im.mode
        deep = png16.to_8bit(Path(path), im) if im.format == "PNG" else None  # by the bits the values use
        if deep:
            img = deep[0]
            if orientation in _TRANSPOSE:
                img = img.transpose(_TRANSPOSE[orientation])
        else:
            img = ImageOps.exif_transpose(im) if orientation not in (1, None) else im.copy()
            img.info = dict(im.info)  # transparency lives in info; keep it through the transpose
    if frames > 1:
        log.info("%s image %s has %d frames; using the first", what, path, frames)
    if orientation not in (1, None):
        log.info("%s image %s: EXIF orientation %s applied", what, path, orientation)
    if deep:
        log.warning("%s image %s: %s", what, path, deep[1])
    elif img.mode in _SIXTEEN_BIT or img.mode in ("I", "F"):
        img = _to_8bit(img)
        log.warning("%s image %s is %s (more than 8 bits per pixel), scaled to 8-bit", what, path, source_mode)
    img, composited = _flatten_alpha(img)
    if composited:
        log.warning("%s image %s (%s) has transparent pixels; composited on white", what, path, source_mode)
    elif img.mode != "RGB":
        if img.mode == source_mode and not deep:  # a scaled 16-bit image was announced above
            log.warning("%s image %s is %s, converted to RGB", what, path, source_mode)
        img = img.convert("RGB")
    return img
