"""16-bit PNGs to 8 bits by the bits their samples actually use.

A 16-bit PNG may hold 8-, 10- or 12-bit values (a scanner's or camera's raw range, often without
scaling them up): dividing by 65535/255 makes such a photo nearly black. Pillow also reads 16-bit
colour PNGs by their high byte only (values < 256 become 0). So the full 16-bit samples are read
(the colour case by decoding the data twice, high and low bytes: Pillow's C decoder undoes the PNG
filters either way), and the scale comes from the PNG's sBIT chunk when its values fit in it, else
from the value range (at most 8, 10 or 12 bits), else the full 16 bits. Each photo's choice is
returned as a sentence for the log.
"""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
from PIL import Image

SIGNATURE = b"\x89PNG\r\n\x1a\n"
LOW_BITS = (8, 10, 12)  # depths inferred from the value range when no sBIT chunk says so


def header(path: Path) -> tuple[int, int, tuple[int, ...] | None] | None:
    """(bit depth, colour type, sBIT bytes or None) from the chunks before the image data."""
    with open(path, "rb") as f:
        if f.read(8) != SIGNATURE:
            return None
        depth = colour = None
        sbit = None
        while True:
            head = f.read(8)
            if len(head) < 8:
                break
            length, kind = struct.unpack(">I4s", head)
            if kind == b"IDAT" or length > 1 << 20:
                break
            body = f.read(length)
            f.seek(4, 1)  # CRC
            if kind == b"IHDR":
                depth, colour = body[8], body[9]
            elif kind == b"sBIT":
                sbit = tuple(body)
    return None if depth is None else (depth, colour, sbit)


def _samples(im: Image.Image, path: Path) -> tuple[np.ndarray, bool]:
    """(uint16 samples [H, W, C], whether the low bytes could be read)."""
    if im.mode.startswith("I;16"):
        return np.asarray(im).astype(np.uint16)[..., None], True
    high = np.asarray(im).astype(np.uint16)
    if high.ndim == 2:
        high = high[..., None]
    with Image.open(path) as again:  # the same data, unpacked from the low byte of each sample
        tile = again.tile[0]
        raw = tile.args if isinstance(tile.args, str) else None
        if raw is None or not raw.endswith(";16B"):
            return high << 8, False
        try:
            again.tile = [tile._replace(args=raw[:-1] + "L")]
            again.load()
        except (ValueError, OSError):
            return high << 8, False
        low = np.asarray(again).astype(np.uint16)
    return (high << 8) | low.reshape(high.shape), True


def to_8bit(path: Path, im: Image.Image) -> tuple[Image.Image, str] | None:
    """The loaded 16-bit PNG `im` as an 8-bit image of its own mode family, and what was done;
    None when `path` is not a 16-bit PNG."""
    info = header(path)
    if info is None or info[0] != 16:
        return None
    _, colour, sbit = info
    v, full = _samples(im, path)
    alpha = colour in (4, 6)
    vmax = int(v[..., :-1].max() if alpha and v.shape[-1] > 1 else v.max())
    bits, why = 16, "full 16-bit range"
    sig = max(sbit[:len(sbit) - (1 if alpha and len(sbit) > 1 else 0)]) if sbit else None
    if sig and sig < 16 and vmax < 2 ** sig:
        bits, why = sig, f"its sBIT chunk says {sig} significant bits and the values fit"
    elif not sig:
        fit = next((b for b in LOW_BITS if vmax < 2 ** b), None)
        if fit is not None:
            bits, why = fit, f"no sBIT chunk; the largest value {vmax} fits in {fit} bits"
    scale = 255.0 / (2 ** bits - 1)
    out = np.clip(np.round(v.astype(np.float64) * scale), 0, 255).astype(np.uint8)
    mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[out.shape[-1]]
    image = Image.fromarray(out[..., 0] if mode == "L" else out, mode=mode)
    note = (f"16-bit PNG read as {bits}-bit values ({why}), scaled by 255/{2 ** bits - 1} to 8 bits; "
            f"largest value {vmax}")
    if not full:
        note += "; only the high byte of each sample could be read (Pillow), so precision is 8 bits at most"
    return image, note
