"""Decoding the odd files real datasets contain: each case is a file a user might drop in."""

from __future__ import annotations

import hashlib
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import make_pattern_image
from PIL import Image, features

from trainer.core.errors import ImageError
from trainer.data.images import (
    IMAGE_EXTENSIONS,
    MAX_PIXELS,
    file_sha256,
    image_extensions,
    image_info,
    load_image,
)

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def close(pixel: tuple[int, ...], expected: tuple[int, ...], tol: int) -> bool:
    return all(abs(a - b) <= tol for a, b in zip(pixel, expected, strict=True))


# --- files that must decode, and what the user must see ------------------------------------------


def _rgba(path: Path) -> None:
    arr = np.zeros((4, 4, 4), np.uint8)
    arr[:, :2] = (255, 0, 0, 0)  # fully transparent left half (colour must not leak through)
    arr[:, 2] = (255, 0, 0, 128)  # half-transparent red
    arr[:, 3] = (0, 0, 255, 255)  # opaque blue
    Image.fromarray(arr, "RGBA").save(path)


def _palette_transparent(path: Path) -> None:
    img = Image.new("P", (4, 4), 0)
    img.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)  # index 0 black (transparent), 1 green
    img.paste(1, (2, 0, 4, 4))
    img.save(path, transparency=0)


def _la(path: Path) -> None:
    arr = np.zeros((4, 4, 2), np.uint8)
    arr[:, 2:] = (60, 255)
    Image.fromarray(arr, "LA").save(path)


def _grey16(path: Path) -> None:
    Image.fromarray(np.full((4, 4), 32896, np.uint16)).save(path)  # mid-grey in 16 bits


def _grey16_big_endian(path: Path) -> None:
    Image.fromarray(np.full((4, 4), 32896, np.uint16).astype(">u2")).save(path)


def _grey_int32(path: Path) -> None:
    Image.fromarray(np.full((4, 4), 32896, np.int32), "I").save(path)


def _grey_float(path: Path) -> None:
    Image.fromarray(np.full((4, 4), 0.5, np.float32), "F").save(path)


def _cmyk(path: Path) -> None:
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(path, quality=95)  # red ink


def _grey(path: Path) -> None:
    Image.new("L", (4, 4), 100).save(path)


def _animated(path: Path) -> None:
    frames = [Image.new("RGB", (8, 8), RED), Image.new("RGB", (8, 8), BLUE)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)


# (name, file name, writer, pixel (x, y), expected RGB, tolerance)
DECODE_CASES: list[tuple[str, str, Callable[[Path], None], tuple[int, int], tuple[int, int, int], int]] = [
    ("rgba transparent is white", "a.png", _rgba, (0, 0), WHITE, 0),
    ("rgba half alpha blends on white", "a.png", _rgba, (2, 0), (255, 127, 127), 2),
    ("rgba opaque kept", "a.png", _rgba, (3, 0), BLUE, 0),
    ("palette transparency is white", "p.png", _palette_transparent, (0, 0), WHITE, 0),
    ("palette opaque kept", "p.png", _palette_transparent, (3, 0), (0, 255, 0), 0),
    ("grey+alpha transparent is white", "la.png", _la, (0, 0), WHITE, 0),
    ("grey+alpha opaque kept", "la.png", _la, (3, 0), (60, 60, 60), 0),
    ("16-bit png mid-grey scaled, not clipped", "g.png", _grey16, (1, 1), (128, 128, 128), 1),
    ("16-bit big-endian tiff scaled", "g.tif", _grey16_big_endian, (1, 1), (128, 128, 128), 1),
    ("32-bit int tiff holding 16-bit data", "i.tif", _grey_int32, (1, 1), (128, 128, 128), 1),
    ("float tiff 0..1 scaled", "f.tif", _grey_float, (1, 1), (128, 128, 128), 1),
    ("cmyk jpeg keeps its colour", "c.jpg", _cmyk, (8, 8), RED, 30),
    ("greyscale becomes rgb", "l.png", _grey, (0, 0), (100, 100, 100), 0),
    ("animated gif gives first frame", "anim.gif", _animated, (4, 4), RED, 8),
    ("animated webp gives first frame", "anim.webp", _animated, (4, 4), RED, 8),
]


@pytest.mark.parametrize(("name", "filename", "write", "xy", "expected", "tol"), DECODE_CASES,
                         ids=[case[0] for case in DECODE_CASES])
def test_load_image_shows_what_a_viewer_shows(tmp_path: Path, name: str, filename: str,
                                              write: Callable[[Path], None], xy: tuple[int, int],
                                              expected: tuple[int, int, int], tol: int) -> None:
    path = tmp_path / filename
    write(path)
    img = load_image(path)
    assert img.mode == "RGB"
    assert img.size == Image.open(path).size
    assert close(img.getpixel(xy), expected, tol), img.getpixel(xy)


def test_exif_rotated_jpeg_is_upright_in_pixels_and_reported_size(tmp_path: Path) -> None:
    stored = np.zeros((20, 40, 3), np.uint8)  # stored landscape: left half red, right half blue
    stored[:, :20] = RED
    stored[:, 20:] = BLUE
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    path = tmp_path / "phone.jpg"
    Image.fromarray(stored).save(path, exif=exif.tobytes(), quality=95)

    assert image_info(path) == (20, 40)
    img = load_image(path)
    assert img.size == (20, 40)
    assert close(img.getpixel((10, 5)), RED, 40)  # the stored left edge is now the top
    assert close(img.getpixel((10, 35)), BLUE, 40)


def test_loaded_image_outlives_its_file(tmp_path: Path) -> None:
    path = tmp_path / "x.png"
    make_pattern_image((16, 8), 0).save(path)
    img = load_image(path)
    path.unlink()
    assert img.size == (16, 8) and np.asarray(img).shape == (8, 16, 3)


# --- files that must be refused with a message that names them -----------------------------------


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims a size; no pixel data needs to exist to test the size limit."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _truncated(fmt: str) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        make_pattern_image((96, 96), 3).save(path, format=fmt)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) * 6 // 10])
    return write


# (name, file name, writer, words the message must contain)
BROKEN_CASES: list[tuple[str, str, Callable[[Path], None], str]] = [
    ("zero bytes", "empty.png", lambda p: p.write_bytes(b""), "empty"),
    ("text named .png", "notes.png", lambda p: p.write_text("hello, not a picture"), "not an image"),
    ("eps renamed .png is never handed to ghostscript", "eps.png",
     lambda p: p.write_text("%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"), "not an image"),
    ("truncated jpeg", "cut.jpg", _truncated("JPEG"), "truncated"),
    ("truncated png", "cut.png", _truncated("PNG"), "truncated"),
    ("over the megapixel limit", "huge.png", lambda p: p.write_bytes(_png_header(9000, 9000)), "megapixel"),
    ("pillow's own bomb limit", "bomb.png", lambda p: p.write_bytes(_png_header(20000, 20000)), "megapixel"),
]


@pytest.mark.parametrize(("name", "filename", "write", "words"), BROKEN_CASES, ids=[c[0] for c in BROKEN_CASES])
def test_broken_files_raise_image_error_naming_the_file(tmp_path: Path, name: str, filename: str,
                                                        write: Callable[[Path], None], words: str) -> None:
    path = tmp_path / filename
    write(path)
    with pytest.raises(ImageError) as caught:
        load_image(path)
    assert str(path) in str(caught.value)
    assert words in str(caught.value)
    assert caught.value.hint  # always says what to do
    with pytest.raises(ImageError):
        image_info(path, verify=True)


def test_missing_file_is_an_image_error(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="Cannot read"):
        load_image(tmp_path / "gone.png")
    with pytest.raises(ImageError, match="Cannot read"):
        file_sha256(tmp_path / "gone.png")


def test_image_info_reads_headers_only_unless_asked_to_verify(tmp_path: Path) -> None:
    path = tmp_path / "cut.jpg"
    _truncated("JPEG")(path)
    assert image_info(path) == (96, 96)  # the header is intact; only verify reads further
    with pytest.raises(ImageError, match="truncated"):
        image_info(path, verify=True)


def test_limit_is_local_not_a_pillow_global() -> None:
    before = Image.MAX_IMAGE_PIXELS
    assert MAX_PIXELS < before  # our limit bites first ...
    assert Image.MAX_IMAGE_PIXELS == before  # ... without touching Pillow's


# --- small helpers -------------------------------------------------------------------------------


def test_extensions_and_hash(tmp_path: Path) -> None:
    assert {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"} <= IMAGE_EXTENSIONS
    assert (".avif" in image_extensions()) == features.check("avif")
    path = tmp_path / "x.bin"
    path.write_bytes(b"abc" * 1000)
    assert file_sha256(path) == hashlib.sha256(b"abc" * 1000).hexdigest()
