"""Subject and class images at a stage's resolution, with low-res views for stage II.

Pixels are float tensors in [-1, 1] (what IF's UNets see). Resizing follows IF's training recipe:
a square centre crop, then PIL BICUBIC. Low-res conditions are made from the high-res tensor with
antialiased bicubic downsampling, so a random crop and its condition always come from the same pixels.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from stages import photos
from stages.errors import InputError

log = logging.getLogger(__name__)

SUBJECT_PHOTOS = (3, 5)  # the paper's 3-5 subject photos; outside it is allowed, with a warning


class ImageInputError(InputError):
    """A bad image folder or file; the message names it."""


def list_images(folder: Path) -> list[Path]:
    """Files of a folder that PIL reads as images (hidden and non-regular files left out)."""
    return photos.scan_folder(Path(folder)).images


def load_folder(folder: str | Path, min_size: int, what: str = "subject", allow_upscale: bool = False,
                min_count: int = 1) -> list[Image.Image]:
    """Open and validate every image of a folder (see stages/photos.py for what counts and how a
    photo becomes RGB): at least `min_size` on the short side (or upscaled with a warning when
    allowed). Every bad file is named in one ImageInputError."""
    folder = Path(folder)
    if not folder.exists():
        raise ImageInputError(f"{what} folder not found: {folder}")
    if not folder.is_dir():
        raise ImageInputError(f"{what} path is not a folder: {folder}")
    scan = photos.scan_folder(folder)
    scan.log_skipped(what)
    if len(scan.images) < min_count:
        raise ImageInputError(f"{what} folder {folder} has {len(scan.images)} images (any format PIL reads); "
                              f"at least {min_count} needed")
    images, bad = [], []
    for p in scan.images:
        try:
            img = photos.open_photo(p, what)
        except photos.READ_ERRORS as e:
            bad.append((p, f"cannot be read ({e.__class__.__name__}: {e})"))
            continue
        short = min(img.size)
        if short < min_size:
            if not allow_upscale:
                bad.append((p, f"is {img.size[0]}x{img.size[1]}, smaller than the stage's {min_size}px "
                               f"(set allow_upscale to upscale it)"))
                continue
            log.warning("%s image %s is %dpx on its short side; upscaling to %dpx", what, p, short, min_size)
        img.filename = str(p)  # copy()/convert() drop it; the centre-crop log names the file
        images.append(img)
    if len(bad) == 1:
        raise ImageInputError(f"{what} image {bad[0][0]} {bad[0][1]}")
    if bad:
        raise ImageInputError(f"{what} folder {folder} has {len(bad)} bad images: "
                              + "; ".join(f"{p.name} {why}" for p, why in bad))
    lo, hi = SUBJECT_PHOTOS
    if what == "subject" and not lo <= len(images) <= hi:
        log.warning("subject folder %s has %d photo(s); DreamBooth expects %d-%d of the subject", folder,
                    len(images), lo, hi)
    return images


def center_square(img: Image.Image, name: str = "") -> Image.Image:
    w, h = img.size
    if w == h:
        return img
    log.info("image %s is %dx%d: centre-cropped to %dx%d", name, w, h, min(w, h), min(w, h))
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return img.crop((left, top, left + s, top + s))


def to_tensor(img: Image.Image, size: int) -> torch.Tensor:
    """Square-crop, resize with PIL BICUBIC, and map to a [-1, 1] CHW float tensor."""
    img = center_square(img, getattr(img, "filename", "")).resize((size, size), Image.BICUBIC, reducing_gap=None)
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def stack(images: list[Image.Image], size: int) -> torch.Tensor:
    return torch.stack([to_tensor(im, size) for im in images])


def downsample(x: torch.Tensor, size: int) -> torch.Tensor:
    """The low-res view of a [-1, 1] batch (antialiased bicubic), clamped back into range."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, (size, size), mode="bicubic", antialias=True, align_corners=False).clamp(-1, 1)


def random_crops(x: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """One random `size` crop per image of a [B, C, H, W] batch."""
    _, _, h, w = x.shape
    tops = torch.randint(0, h - size + 1, (x.shape[0],), generator=generator).tolist()
    lefts = torch.randint(0, w - size + 1, (x.shape[0],), generator=generator).tolist()
    return torch.stack([im[:, t:t + size, l:l + size] for im, t, l in zip(x, tops, lefts)])


def to_pil(x: torch.Tensor) -> list[Image.Image]:
    arr = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


def grid(images: list[Image.Image | None], cols: int | None = None) -> Image.Image:
    """Images in rows of `cols`; a None leaves its cell white (a prompt's row that is not full)."""
    cols = cols or len(images)
    rows = (len(images) + cols - 1) // cols
    w, h = next(im for im in images if im is not None).size
    out = Image.new("RGB", (cols * w, rows * h), "white")
    for i, im in enumerate(images):
        if im is not None:
            out.paste(im, ((i % cols) * w, (i // cols) * h))
    return out
