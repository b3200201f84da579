"""Real-world photos (issue 9, items 7-9): EXIF orientation, 16-bit and transparent images, every
format PIL reads, hidden and non-regular files, all bad files in one error, photo-count warnings."""
from __future__ import annotations

import logging
import os

import numpy as np
import pytest
from PIL import Image

from stages import data, photos


def _halves(w=120, h=80) -> np.ndarray:
    """Left half red, right half blue: any rotation or flip shows."""
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 2] = (230, 20, 20)
    a[:, w // 2:] = (20, 20, 230)
    return a


def test_exif_orientation_is_applied(tmp_path, caplog):
    folder = tmp_path / "s"
    folder.mkdir()
    im = Image.fromarray(_halves())
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display": a phone held upright
    im.save(folder / "phone.jpg", exif=exif.tobytes(), quality=95)
    with caplog.at_level(logging.INFO):
        (img,) = data.load_folder(folder, 64)
    assert img.size == (80, 120)  # portrait, as the phone showed it
    a = np.asarray(img, dtype=np.int16)
    top, bottom = a[:50].mean((0, 1)), a[-50:].mean((0, 1))
    assert top[0] > 200 and top[2] < 60  # the left (red) side is now on top
    assert bottom[2] > 200 and bottom[0] < 60
    assert any("EXIF orientation 6" in r.message for r in caplog.records)


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_16bit_is_scaled_not_clipped(tmp_path, mode, caplog):
    ramp = np.tile(np.linspace(0, 65535, 96), (96, 1))
    if mode == "I":
        im = Image.fromarray(ramp.astype(np.int32), mode="I")
    elif mode == "I;16B":  # big-endian 16-bit, as TIFFs from some scanners are (PIL's convert clips)
        im = Image.frombytes(mode, (96, 96), ramp.astype(">u2").tobytes())
    else:
        im = Image.fromarray(ramp.astype(np.uint16))
    assert im.mode == mode
    with caplog.at_level(logging.WARNING):
        img = photos.open_photo(_save(im, tmp_path / "g.tif"))
    a = np.asarray(img, dtype=np.float64)
    assert img.mode == "RGB" and a[:, 0].max() <= 1 and a[:, -1].min() >= 254
    assert abs(a.mean() - 127.5) < 2  # a ramp stays a ramp (PIL's convert gives ~255 everywhere)
    assert any("scaled to 8-bit" in r.message for r in caplog.records)


def _save(im: Image.Image, path):
    im.save(path)
    return path


def test_16bit_png_round_trip(tmp_path):
    im = Image.fromarray(np.full((80, 80), 32768, np.uint16))
    im.save(tmp_path / "g.png")
    assert Image.open(tmp_path / "g.png").mode.startswith("I")
    assert abs(np.asarray(photos.open_photo(tmp_path / "g.png")).mean() - 127.5) < 1


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparency_composited_on_white(tmp_path, mode, caplog):
    rgba = np.zeros((80, 80, 4), np.uint8)
    rgba[..., 1] = 200  # hidden colour under the transparent half: green
    rgba[:, :40] = (30, 30, 30, 255)  # opaque dark left half
    im = Image.fromarray(rgba, "RGBA")
    if mode == "LA":
        im = im.convert("LA")
    elif mode == "P":
        im = im.convert("P")
        im.info["transparency"] = im.getpixel((79, 0))
    path = tmp_path / f"x.{'gif' if mode == 'P' else 'png'}"
    im.save(path, **({"transparency": im.info["transparency"]} if mode == "P" else {}))
    with caplog.at_level(logging.WARNING):
        a = np.asarray(photos.open_photo(path), dtype=np.int16)
    assert (a[:, 50:] == 255).all(), "transparent pixels must become white, not their hidden colour"
    assert a[:, :30].max() < 60
    assert any("composited on white" in r.message for r in caplog.records)


def test_every_pil_format_hidden_files_and_counts(tmp_path, caplog):
    folder = tmp_path / "s"
    folder.mkdir()
    rgb = Image.fromarray(_halves(96, 96))
    rgb.save(folder / "a.tif")
    rgb.save(folder / "b.jpeg")
    frames = [rgb.convert("P"), Image.new("RGB", (96, 96), "green").convert("P")]
    frames[0].save(folder / "c.gif", save_all=True, append_images=frames[1:])
    rgb.save(folder / "d.bmp")
    rgb.save(folder / "e_no_suffix", format="PNG")
    (folder / "._a.tif").write_bytes(b"\x00\x05\x16\x07AppleDouble")
    (folder / ".DS_Store").write_bytes(b"junk")
    (folder / "notes.txt").write_text("not a photo")
    with caplog.at_level(logging.INFO):
        images = data.load_folder(folder, 64)
    assert len(images) == 5  # tif, jpeg, gif (first frame), bmp, PNG without suffix
    gif = np.asarray(images[2], dtype=np.int16)
    assert gif[:, :40, 0].mean() > 150  # the first frame (red/blue), not the green one
    text = " ".join(r.message for r in caplog.records)
    assert "2 hidden file(s)" in text and "._a.tif" in text and "notes.txt" in text
    assert "5 photo(s)" not in text  # 5 is within 3-5: no count warning


def test_photo_count_warnings(tmp_path, caplog, write_subject):
    one = write_subject(tmp_path / "one", 1, 80)
    many = write_subject(tmp_path / "many", 7, 80)
    with caplog.at_level(logging.WARNING):
        data.load_folder(one, 64)
        data.load_folder(many, 64)
    text = " ".join(r.message for r in caplog.records)
    assert "has 1 photo(s)" in text and "has 7 photo(s)" in text and "3-5" in text


def test_all_bad_files_reported_at_once(tmp_path):
    folder = tmp_path / "s"
    folder.mkdir()
    Image.new("RGB", (96, 96)).save(folder / "good.png")
    (folder / "bad1.jpg").write_bytes(b"not a jpeg")
    (folder / "bad2.png").write_bytes(b"")
    Image.new("RGB", (30, 30)).save(folder / "tiny.png")
    with pytest.raises(data.ImageInputError) as e:
        data.load_folder(folder, 64)
    msg = str(e.value)
    assert "3 bad images" in msg and "bad1.jpg cannot be read" in msg and "bad2.png cannot be read" in msg
    assert "tiny.png is 30x30" in msg and "\n" not in msg


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_is_skipped_without_opening(tmp_path, caplog, write_subject):
    folder = write_subject(tmp_path / "s", 3, 80)
    os.mkfifo(folder / "pipe.jpg")  # opening it for reading would block forever
    with caplog.at_level(logging.WARNING):
        images = data.load_folder(folder, 64)
    assert len(images) == 3
    assert any("pipe.jpg" in r.message and "not regular files" in r.message for r in caplog.records)


def _png16(path, a: np.ndarray, sbit=None, filtered: bool = True):
    """A 16-bit PNG written by hand (Pillow cannot write 16-bit colour): greyscale [H, W] or RGB(A)
    [H, W, C]; rows alternate the Paeth, Sub and Up filters (the decoder must undo each with 6-8
    bytes per pixel), and an optional sBIT chunk."""
    import struct
    import zlib

    h, w = a.shape[:2]
    c = 1 if a.ndim == 2 else a.shape[2]
    raw = a.reshape(h, w * c).astype(">u2").view(np.uint8).reshape(h, w * c * 2).astype(np.int32)
    bpp = 2 * c
    rows = []
    for y in range(h):
        cur, up = raw[y], raw[y - 1] if y else np.zeros_like(raw[0])
        left = np.concatenate([np.zeros(bpp, np.int32), cur[:-bpp]])
        upleft = np.concatenate([np.zeros(bpp, np.int32), up[:-bpp]])
        kind = (4, 1, 2)[y % 3] if filtered else 0
        if kind == 4:
            p = left + up - upleft
            pa, pb, pc = np.abs(p - left), np.abs(p - up), np.abs(p - upleft)
            pred = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, upleft))
        else:
            pred = {0: 0, 1: left, 2: up}[kind]
        rows.append(bytes([kind]) + ((cur - pred) % 256).astype(np.uint8).tobytes())

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
    colour = {1: 0, 3: 2, 4: 6}[c]
    body = chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, colour, 0, 0, 0))
    if sbit:
        body += chunk(b"sBIT", bytes(sbit))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body + chunk(b"IDAT", zlib.compress(b"".join(rows))) + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("bits, sbit, channels", [(12, True, 3), (12, False, 3), (8, False, 3), (8, True, 1),
                                                  (12, False, 1), (10, True, 4), (16, False, 3)])
def test_16bit_png_scaled_by_the_bits_its_values_use(tmp_path, caplog, bits, sbit, channels):
    """Issue 17 item 13: a 16-bit PNG holding 8- or 12-bit values loads at its real brightness (it
    was nearly black), scaled by the sBIT chunk or the value range, with a warning saying which."""
    rng = np.random.default_rng(bits)
    top = 2 ** bits - 1
    shape = (40, 48) if channels == 1 else (40, 48, channels)
    values = rng.integers(0, top + 1, shape).astype(np.uint16)
    values.reshape(-1, channels)[:, :3][:1] = top  # the full range is used
    if channels == 4:
        values[..., 3] = top  # opaque
    path = _png16(tmp_path / "deep.png", values, [bits] * channels if sbit else None)
    with caplog.at_level(logging.WARNING):
        img = photos.open_photo(path)
    got = np.asarray(img, dtype=np.float64)
    colour = values if channels == 1 else values[..., :3]
    expected = np.round(colour.astype(np.float64) * 255 / top)
    expected = np.repeat(expected[..., None], 3, -1) if channels == 1 else expected
    assert img.mode == "RGB" and np.abs(got - expected).max() <= 1  # every pixel, not only the mean
    text = " ".join(r.message for r in caplog.records)
    assert f"read as {bits}-bit values" in text and ("sBIT" in text) == (bits < 16) and f"255/{top}" in text


def test_16bit_png_truly_16bit_stays_divided_by_257(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 64), (32, 1)).astype(np.uint16)
    path = _png16(tmp_path / "ramp.png", np.stack([ramp] * 3, -1), [16, 16, 16])
    a = np.asarray(photos.open_photo(path), dtype=np.float64)
    assert np.abs(a[..., 0] - np.round(ramp / 257)).max() <= 1
