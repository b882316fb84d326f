"""The bad-input corpus: every kind of broken or odd file an artist may feed LoRA Studio.

Each case says what must happen -- ``used`` (handled correctly, maybe with a warning),
``skipped`` (reported and left out, training goes on), ``ignored`` (not a picture; no noise) or
``error`` (nothing to train on: one clear message) -- and is run through the full paths:

- the engine: scan + lint + the training set's pixel loader (datasets), settings validation and
  session setup (configs), the Generate path's LoRA loading (LoRA files);
- the CLI: ``lora-studio train --check`` / ``train`` / ``generate`` / ``inspect`` through
  ``main([...])`` with the exit code and the one-line message asserted (a traceback would fail
  the test), plus one real ``lora-studio train`` subprocess on a folder holding every tolerable
  case at once;
- the GUI: the same files uploaded to a real server through gradio_client (``/upload_images``,
  ``/check_training``, ``/start_training``, ``/upload_loras``, ``/inspect_lora``, ``/generate``),
  checking the grid's problem column and the error toasts.

The files are generated here (no binaries in the repository). Unit-level decoding details live
in test_images/test_dataset/test_formats; this module checks what the user sees end to end.
"""

from __future__ import annotations

import os
import pickle
import struct
import subprocess
import sys
import tracemalloc
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from child_process import child_env
from conftest import app_error, make_pattern_image
from PIL import Image, features

from trainer.cli.main import main
from trainer.config.schema import DataConfig
from trainer.core.errors import StudioError
from trainer.core.safetensors_header import MAX_HEADER_BYTES
from trainer.data.lint import lint_dataset
from trainer.data.scan import DatasetItem, DatasetScan, scan_dataset
from trainer.data.training_set import TrainingSet
from trainer.lora.reading import read_lora_file

RESOLUTION = 64  # the tiny model's native size


# --- writers -------------------------------------------------------------------------------------


def picture(path: Path, caption: str | None = None, size: tuple[int, int] = (64, 64), seed: int = 0,
            **save: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    make_pattern_image(size, seed).save(path, **save)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption, encoding="utf-8")


def sidecar(path: Path, raw: bytes) -> None:
    path.with_suffix(".txt").write_bytes(raw)


def png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG that claims ``width`` x ``height`` with almost no data: tests the size limit without the memory."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + ihdr + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def truncated(fmt: str, suffix: str) -> Callable[[Path], None]:
    def write(folder: Path) -> None:
        path = folder / f"cut{suffix}"
        make_pattern_image((96, 96), 3).save(path, format=fmt)
        path.write_bytes(path.read_bytes()[: path.stat().st_size * 6 // 10])
        sidecar(path, b"zxq, cut")
    return write


def grey16(folder: Path) -> None:
    Image.fromarray(np.full((64, 64), 32896, np.uint16)).save(folder / "deep.png")  # 16-bit mid-grey
    sidecar(folder / "deep.png", b"zxq, grey")


def cmyk(folder: Path) -> None:
    Image.new("CMYK", (64, 64), (0, 255, 255, 0)).save(folder / "print.jpg", quality=95)  # red ink
    sidecar(folder / "print.jpg", b"zxq, red")


def palette_transparent(folder: Path) -> None:
    img = Image.new("P", (64, 64), 0)
    img.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    img.paste(1, (40, 0, 64, 64))
    img.save(folder / "pal.png", transparency=0)
    sidecar(folder / "pal.png", b"zxq, palette")


def rgba(folder: Path) -> None:
    arr = np.zeros((64, 64, 4), np.uint8)
    arr[16:48, 16:48] = (0, 0, 255, 255)  # an opaque blue square on a fully transparent background
    Image.fromarray(arr, "RGBA").save(folder / "cutout.png")
    sidecar(folder / "cutout.png", b"zxq, cutout")


def grey(folder: Path) -> None:
    make_pattern_image((64, 64), 4).convert("L").save(folder / "bw.png")
    sidecar(folder / "bw.png", b"zxq, black and white")


def exif_rotated(folder: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown portrait (a phone held upright)
    make_pattern_image((128, 64), 5).save(folder / "phone.jpg", exif=exif.tobytes(), quality=95)
    sidecar(folder / "phone.jpg", b"zxq, phone photo")


def broken_exif(folder: Path) -> None:
    make_pattern_image((64, 64), 6).save(folder / "oddexif.jpg", exif=b"Exif\x00\x00II*\x00\x08\x00\x00\x00\xff\xff")
    sidecar(folder / "oddexif.jpg", b"zxq, odd exif")


def animated_gif(folder: Path) -> None:
    frames = [Image.new("RGB", (64, 64), (255, 0, 0)), Image.new("RGB", (64, 64), (0, 0, 255))]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    sidecar(folder / "anim.gif", b"zxq, animation")


def avif(folder: Path) -> None:
    path = folder / "modern.avif"
    if features.check("avif"):
        make_pattern_image((64, 64), 7).save(path, quality=90)
    else:
        path.write_bytes(b"\0\0\0\x1cftypavif" + b"\0" * 64)
    sidecar(path, b"zxq, avif")


def case_twins(folder: Path) -> None:
    picture(folder / "Cat.png", "zxq, big cat", seed=11)
    picture(folder / "cat.png", "zxq, small cat", seed=12)


def symlink_loop(folder: Path) -> None:
    (folder / "sub").mkdir()
    picture(folder / "sub" / "inner.png", "zxq, inner", seed=13)
    (folder / "sub" / "back").symlink_to("..")  # sub/back -> the dataset root, which holds sub ...
    (folder / "self").symlink_to(".")


def locked(name: str, what: str) -> Callable[[Path], None]:
    def write(folder: Path) -> None:
        picture(folder / name, "zxq, locked", seed=14)
        target = folder / name if what == "image" else (folder / name).with_suffix(".txt")
        target.chmod(0)
    return write


def readable(path: Path) -> bool:
    """Whether this process can read ``path`` (root reads anything, whatever its mode)."""
    try:
        with open(path, "rb") as fh:
            fh.read(1)
        return True
    except OSError:
        return False


# --- dataset cases -------------------------------------------------------------------------------

Check = Callable[[DatasetItem, DatasetScan, torch.Tensor], None]


@dataclass(frozen=True)
class DataCase:
    name: str
    build: Callable[[Path], None]  # writes the case's files into the dataset folder
    expect: str  # "used" | "skipped" | "ignored" | "error"
    target: str = ""  # the file the case is about (relative to the dataset folder)
    code: str | None = None  # the issue the scan/lint must report for it (None: no issue about it)
    words: str = ""  # words in that issue's message, or in the error
    severity: str = "warning"  # of that issue: "error" makes `train --check` exit 2
    bare: bool = False  # no good pictures alongside (the case is about the folder as a whole)
    check: Check | None = None  # what the loaded pixels / item must look like
    data: Callable[[Path], Path] | None = None  # the --data path when it is not the folder itself


def _pixel_check(predicate: Callable[[torch.Tensor], bool]) -> Check:
    def check(item: DatasetItem, scan: DatasetScan, pixels: torch.Tensor) -> None:
        assert predicate(pixels), f"{item.path.name}: pixels mean {pixels.mean(dim=(1, 2)).tolist()}"
    return check


def _caption_check(expected: str) -> Check:
    def check(item: DatasetItem, scan: DatasetScan, pixels: torch.Tensor) -> None:
        assert item.caption == expected, item.caption
    return check


def _size_check(width: int, height: int) -> Check:
    def check(item: DatasetItem, scan: DatasetScan, pixels: torch.Tensor) -> None:
        assert (item.width, item.height) == (width, height)
    return check


def _twins_check(item: DatasetItem, scan: DatasetScan, pixels: torch.Tensor) -> None:
    by_name = {i.path.name: i.caption for i in scan.items}
    assert by_name["Cat.png"] == "zxq, big cat" and by_name["cat.png"] == "zxq, small cat"


def _walked_once(item: DatasetItem, scan: DatasetScan, pixels: torch.Tensor) -> None:
    names = sorted(i.path.name for i in scan.items)
    assert names == ["good0.png", "good1.png", "inner.png"], names


HUGE_CAPTION = ", ".join(f"tag number {i}" for i in range(20_000))  # ~330 kB
AVIF_OK = features.check("avif")

DATA_CASES = [
    DataCase("zero-byte file", lambda f: (f / "empty.png").write_bytes(b""), "skipped", "empty.png",
             "unreadable", "empty (0 bytes)", "error"),
    DataCase("text file named .png", lambda f: (f / "notes.png").write_text("hello"), "skipped", "notes.png",
             "unreadable", "not an image this program can read", "error"),
    DataCase("truncated JPEG", truncated("JPEG", ".jpg"), "skipped", "cut.jpg", "unreadable", "truncated", "error"),
    DataCase("truncated PNG", truncated("PNG", ".png"), "skipped", "cut.png", "unreadable", "truncated", "error"),
    DataCase("16-bit PNG is scaled, not clipped", grey16, "used", "deep.png",
             check=_pixel_check(lambda p: abs(float(p.mean())) < 0.02)),
    DataCase("CMYK JPEG keeps its colour", cmyk, "used", "print.jpg",
             check=_pixel_check(lambda p: p[0].mean() > 0.5 and p[1].mean() < -0.5 and p[2].mean() < -0.5)),
    DataCase("palette PNG with transparency on white", palette_transparent, "used", "pal.png",
             check=_pixel_check(lambda p: bool((p[:, :, :30] > 0.99).all()))),
    DataCase("RGBA cut-out on white, not black", rgba, "used", "cutout.png",
             check=_pixel_check(lambda p: bool((p[:, :8, :8] > 0.99).all()) and p[2, 32, 32] > 0.9)),
    DataCase("grayscale becomes grey RGB", grey, "used", "bw.png",
             check=_pixel_check(lambda p: bool((p[0] == p[1]).all() and (p[1] == p[2]).all()))),
    DataCase("EXIF-rotated JPEG is upright", exif_rotated, "used", "phone.jpg", check=_size_check(64, 128)),
    DataCase("malformed EXIF is ignored", broken_exif, "used", "oddexif.jpg"),
    DataCase("1x1 image is flagged but usable", lambda f: picture(f / "dot.png", "zxq, dot", size=(1, 1)),
             "used", "dot.png", "too_small", "upscaled 64.0", "error"),
    DataCase("1x20000 strip: bounded memory", lambda f: picture(f / "strip.png", "zxq, strip", size=(1, 20000)),
             "used", "strip.png", "too_small", "smaller than the 64 px", "error"),
    DataCase("12000x12000 header: refused before decoding", lambda f: png_header_only(f / "bomb.png", 12000, 12000),
             "skipped", "bomb.png", "unreadable", "144 megapixels, more than the 80 megapixel limit", "error"),
    DataCase("animated GIF gives its first frame", animated_gif, "used", "anim.gif",
             check=_pixel_check(lambda p: p[0].mean() > 0.9 and p[2].mean() < -0.9)),
    DataCase("WebP", lambda f: picture(f / "web.webp", "zxq, webp", seed=8, lossless=True), "used", "web.webp"),
    DataCase("AVIF" + ("" if AVIF_OK else " without Pillow support"), avif, "used" if AVIF_OK else "skipped",
             "modern.avif", None if AVIF_OK else "unsupported_format", "" if AVIF_OK else "cannot be read here"),
    DataCase("HEIC is named, not silently dropped", lambda f: (f / "IMG_0001.heic").write_bytes(b"\0" * 64),
             "skipped", "IMG_0001.heic", "unsupported_format", "is a HEIC file, which cannot be read here"),
    DataCase("unrelated file type is ignored", lambda f: (f / "readme.md").write_text("# my set"), "ignored",
             "readme.md"),
    DataCase("macOS ._ resource fork is ignored", lambda f: (f / "._good0.png").write_bytes(b"\0\5\26\7junk"),
             "ignored", "._good0.png"),
    DataCase("PNG content named .jpg", lambda f: picture(f / "really_png.jpg", "zxq, renamed", seed=9, format="PNG"),
             "used", "really_png.jpg"),
    DataCase("upper-case extension", lambda f: picture(f / "PHOTO.JPG", "zxq, shouting", seed=10), "used",
             "PHOTO.JPG"),
    DataCase("caption in Windows-1252", lambda f: (picture(f / "cafe.png", seed=15),
                                                   sidecar(f / "cafe.png", "zxq, café crème".encode("cp1252"))),
             "used", "cafe.png", "caption_encoding", "read as Windows-1252", check=_caption_check("zxq, café crème")),
    DataCase("caption in UTF-16 with BOM", lambda f: (picture(f / "u16.png", seed=16),
                                                      sidecar(f / "u16.png", "zxq, déjà vu".encode("utf-16"))),
             "used", "u16.png", check=_caption_check("zxq, déjà vu")),
    DataCase("caption with UTF-8 BOM", lambda f: (picture(f / "bom.png", seed=17),
                                                  sidecar(f / "bom.png", b"\xef\xbb\xbfzxq, na\xc3\xafve")),
             "used", "bom.png", check=_caption_check("zxq, naïve")),
    DataCase("empty caption", lambda f: picture(f / "blank.png", "", seed=18), "used", "blank.png",
             "empty_caption", "is empty"),
    DataCase("whitespace-only caption", lambda f: picture(f / "spaces.png", " \n\t \r\n", seed=19), "used",
             "spaces.png", "empty_caption", "is empty"),
    DataCase("huge caption", lambda f: picture(f / "essay.png", HUGE_CAPTION, seed=20), "used", "essay.png",
             "caption_too_long", "only the first 75 are read"),
    DataCase("image without caption", lambda f: picture(f / "nocap.png", seed=21), "used", "nocap.png",
             "missing_caption", "has no caption file"),
    DataCase("names differing only in case", case_twins, "used", "Cat.png", check=_twins_check),
    DataCase("symlink loops are walked once", symlink_loop, "used", "sub/inner.png", check=_walked_once),
    DataCase("dangling symlink", lambda f: (f / "gone.png").symlink_to(f / "nowhere.png"), "skipped", "gone.png",
             "unreadable", "No such file", "error"),
    DataCase("unreadable image (chmod 000)", locked("locked.png", "image"), "used-if-readable", "locked.png",
             "unreadable", "Permission denied", "error"),
    DataCase("unreadable caption (chmod 000)", locked("lockedcap.png", "caption"), "used", "lockedcap.png",
             "unreadable_caption-if-unreadable", "Permission denied"),
    DataCase("path with spaces and unicode", lambda f: picture(f / "my pics ✨" / "Ünï cödé 1.png", "zxq, ünï", seed=22),
             "used", "my pics ✨/Ünï cödé 1.png"),
    DataCase("a single picture", lambda f: picture(f / "only.png", "zxq, only one", seed=23), "used", "only.png",
             "few_images", "Only 1 usable picture", bare=True),
    DataCase("folder with no images", lambda f: (f / "notes.txt").write_text("captions, but no pictures"), "error",
             words="Found 0 images", bare=True),
    DataCase("folder of pictures that cannot be read here", lambda f: ((f / "a.heic").write_bytes(b"\0" * 8),
                                                                     (f / "b.psd").write_bytes(b"8BPS")),
             "error", words="only files this program cannot read (1 HEIC, 1 PSD)", bare=True),
    DataCase("folder of broken pictures", lambda f: ((f / "a.png").write_bytes(b""), (f / "b.jpg").write_text("x")),
             "error", words="None of the 2 images", bare=True),
    DataCase("caption in UTF-16 without BOM", lambda f: (picture(f / "u16nobom.png", seed=24),
                                                         sidecar(f / "u16nobom.png", "zxq, déjà vu".encode("utf-16-le"))),
             "used", "u16nobom.png", "caption_encoding", "read as UTF-16 (without a byte-order mark)",
             check=_caption_check("zxq, déjà vu")),
    DataCase("caption with NUL bytes that is not text", lambda f: (picture(f / "nulcap.png", seed=25),
                                                                   sidecar(f / "nulcap.png", b"\0\1\2zxq\0\xff")),
             "used", "nulcap.png", "unreadable_caption", "nulcap.txt is not a text file: it holds NUL bytes",
             check=_caption_check("")),  # trained as uncaptioned, never on the bytes
    DataCase("kohya 0_ folder is not trained", lambda f: picture(f / "0_extra" / "skip.png", "zxq, skip", seed=26),
             "skipped", "0_extra/skip.png", "zero_repeats", "0_extra has 0 repeats, so its 1 picture is not trained"),
    DataCase("kohya -3_ folder is named", lambda f: picture(f / "-3_neg" / "neg.png", "zxq, negative", seed=27),
             "used", "-3_neg/neg.png", "negative_repeats", "-3_neg: a repeat count cannot be negative"),
    DataCase("every picture in a 0_ folder", lambda f: picture(f / "0_all" / "only.png", "zxq, only", seed=28),
             "error", words="every one is in a folder with 0 repeats (0_all)", bare=True),
    DataCase("data path is a file", lambda f: (f / "set.zip").write_bytes(b"PK\3\4"), "error",
             words="is a file, not a folder", bare=True, data=lambda f: f / "set.zip"),
    DataCase("data folder does not exist", lambda f: None, "error", words="does not exist", bare=True,
             data=lambda f: f / "typo"),
]


def _build(case: DataCase, folder: Path) -> Path:
    """Write the case (plus two good pictures unless bare); returns the --data path."""
    folder.mkdir(parents=True, exist_ok=True)
    if not case.bare:
        for i in range(2):
            picture(folder / f"good{i}.png", f"zxq, good picture {i}", seed=100 + i)
    case.build(folder)
    return case.data(folder) if case.data else folder


def _resolved(case: DataCase, folder: Path) -> tuple[str, str | None]:
    """(expect, code) once the files exist: permissions mean nothing to root."""
    expect, code = case.expect, case.code
    if expect == "used-if-readable":
        expect = "used" if readable(folder / case.target) else "skipped"
        code = None if expect == "used" else code
    if code and code.endswith("-if-unreadable"):
        code = None if readable((folder / case.target).with_suffix(".txt")) else code.removesuffix("-if-unreadable")
    return expect, code


def _issue_about(issues, target: Path, code: str):
    for issue in issues:
        if issue.code == code and (issue.path is None or issue.path.with_suffix("") == target.with_suffix("")
                                   or issue.path in target.parents):  # an issue about its folder
            return issue
    return None


@pytest.fixture(scope="module")
def count_tokens():
    from transformers import CLIPTokenizer

    from trainer.models.family import TOKENIZER_DIR
    from trainer.models.text import count_tokens as count

    tokenizer = CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR))
    return lambda caption: count(tokenizer, caption)


def test_the_corpus_is_big_enough() -> None:
    assert len(DATA_CASES) + len(CONFIG_CASES) + len(LORA_CASES) + len(COMMAND_CASES) >= 30
    assert len({c.name for c in DATA_CASES}) == len(DATA_CASES)


@pytest.mark.parametrize("case", DATA_CASES, ids=[c.name for c in DATA_CASES])
def test_dataset_case_in_the_engine(case: DataCase, tmp_path: Path, count_tokens, monkeypatch) -> None:
    folder = (tmp_path / "set").resolve()
    data = _build(case, folder)
    cfg = DataConfig(data=str(data))
    if case.expect == "error":
        with pytest.raises(StudioError, match=_escaped(case.words)) as caught:
            scan = scan_dataset(cfg)
            TrainingSet(scan, cfg, RESOLUTION)
        assert caught.value.hint, "an error always says what to do"
        return

    expect, code = _resolved(case, folder)
    scan = scan_dataset(cfg)
    report = lint_dataset(scan, cfg, RESOLUTION, count_tokens, epochs=1, batch_size=1)
    target = folder / case.target
    items = {item.path: item for item in scan.items}
    if code:
        issue = _issue_about(report.issues, target, code)
        assert issue is not None, [(i.code, i.path) for i in report.issues]
        assert case.words in issue.message + " " + issue.fix and issue.fix
        assert issue.severity == case.severity
    if expect == "used":
        assert target in items, f"{case.target} must be trained on"
    else:
        assert target not in items
    if expect == "ignored":
        assert not any(i.path and i.path.name == target.name for i in report.issues)
    assert report.ok == (not any(i.severity == "error" for i in report.issues))

    # every usable picture decodes to a bucket-sized tensor in range, with bounded memory
    resized_areas = []
    resize = Image.Image.resize

    def recording_resize(self, size, *args, **kwargs):
        resized_areas.append(size[0] * size[1])
        return resize(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", recording_resize)
    training_set = TrainingSet(scan, cfg, RESOLUTION)
    for refs in training_set.epoch_batches(0, 1, seed=0):
        for ref in refs:
            pixels, _, _ = training_set.load_pixels(ref)
            assert pixels.shape == (3, ref.bucket[1], ref.bucket[0]) and torch.isfinite(pixels).all()
            assert pixels.min() >= -1 and pixels.max() <= 1
            item = training_set.items[ref.index]
            if item.path == target and case.check:
                case.check(item, scan, pixels)
    assert max(resized_areas, default=0) <= 2 * RESOLUTION * RESOLUTION, "no picture is scaled far past its bucket"


def _cli(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def _one_error_line(err: str, words: str) -> None:
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith("error: ") and words in lines[-1], err
    assert not any(line.startswith("error: ") for line in lines[:-1])


@pytest.mark.parametrize("case", DATA_CASES, ids=[c.name for c in DATA_CASES])
def test_dataset_case_through_the_cli(case: DataCase, tmp_path: Path, tiny_sd1_dir: Path, capsys) -> None:
    data = _build(case, tmp_path / "set")
    common = ["train", "--base", str(tiny_sd1_dir), "--data", str(data), "--preset", "character-lite"]
    code, out, err = _cli([*common, "--check"], capsys)
    if case.expect == "error":
        assert code == 2
        if case.words in out:  # the folder exists but nothing in it is usable: the report says so
            assert "1 error" in out or "errors" in out
        else:
            _one_error_line(err, case.words)
        code, out, err = _cli([*common, "--steps", "1", "--output", str(tmp_path / "out" / "x.safetensors")], capsys)
        assert code == 2
        _one_error_line(err, case.words)
        assert not (tmp_path / "out" / "x.safetensors").exists()
        return
    expect, issue_code = _resolved(case, tmp_path / "set")
    errors = issue_code is not None and case.severity == "error"
    assert code == (2 if errors else 0), out + err
    assert "usable images of" in out
    if issue_code:
        assert case.words in out, out


def _combined_dataset(root: Path) -> tuple[Path, list[DataCase]]:
    """Every case that is not an error, each in its own sub-folder of one dataset."""
    cases = [c for c in DATA_CASES if c.expect != "error" and not c.bare]
    for index, case in enumerate(cases):
        case.build(_mkdir(root / f"case {index:02d}"))
    picture(root / "good0.png", "zxq, good picture 0", seed=100)
    return root, cases


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


@pytest.mark.slow
def test_training_goes_through_everything_at_once(tmp_path: Path, tiny_sd1_dir: Path) -> None:
    """One real ``lora-studio train`` on a folder holding every tolerable case, at a unicode path."""
    data, cases = _combined_dataset(tmp_path / "dåtä sët ✨")
    output = tmp_path / "out put" / "lørä ✨.safetensors"
    command = [sys.executable, "-m", "trainer.cli", "train", "--base", str(tiny_sd1_dir), "--data", str(data),
               "--preset", "character-lite", "--rank", "4", "--steps", "2", "--batch-size", "2",
               "--output", str(output)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=child_env())
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert "done at step 2" in done.stdout and output.is_file()
    for name in ("empty.png", "bomb.png", "IMG_0001.heic", "blank.png"):
        assert name in done.stdout, f"the run warns about {name}"
    report = (tmp_path / "out put" / "lørä ✨_run" / "dataset-report.txt").read_text(encoding="utf-8")
    assert "usable images of" in report
    read_lora_file(output)
    # A1111's "edit metadata" card (extensions-builtin/Lora/ui_edit_user_metadata.py get_metadata_table and
    # build_tags, re-implemented in ui_readers) on a real export of this odd dataset: 0_ folders left out
    import ui_readers

    meta = ui_readers.read_metadata(output)
    table = dict(ui_readers.metadata_table(meta))
    trained = scan_dataset(DataConfig(data=str(data))).items
    assert table["Dataset size:"] == len(trained)
    assert table["Output name:"] == "lørä ✨"
    assert "0_extra" not in meta["ss_dataset_dirs"] and "Resolution" in " ".join(table)
    assert ui_readers.build_tags(meta)[0] == ("zxq", sum(item.caption.startswith("zxq") for item in trained))


# --- settings cases ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConfigCase:
    name: str
    flags: Callable[[Path], list[str]]  # extra CLI flags, given a scratch folder (to write files into)
    words: str
    without_cuda: bool = False  # the case is about a machine without CUDA (skipped where there is a GPU)


def _toml(text: bytes | str) -> Callable[[Path], list[str]]:
    def flags(scratch: Path) -> list[str]:
        path = scratch / "run.toml"
        path.write_bytes(text.encode() if isinstance(text, str) else text)
        return ["--config", str(path)]
    return flags


def _file_where_a_folder_goes(scratch: Path) -> list[str]:
    (scratch / "taken").write_text("a file")
    return ["--output", str(scratch / "taken" / "lora.safetensors")]


def _fake_base(name: str, content: bytes) -> Callable[[Path], list[str]]:
    def flags(scratch: Path) -> list[str]:
        (scratch / name).write_bytes(content)
        return ["--base", str(scratch / name)]
    return flags


def _checkpoint(folder: Path) -> Path:
    """A checkpoint as the trainer writes it (the real writer; its content is beside the point)."""
    from trainer.train.checkpoints import save_checkpoint

    return save_checkpoint(folder, 1, {"fingerprint": "f", "lora": {"unet": {"w": torch.zeros(2)}}}, keep_last=1)


def _mangled(edit: Callable[[dict], object]) -> Callable[[Path], list[str]]:
    """--resume at a checkpoint whose state.json was edited by hand (or by a bad sync tool)."""
    def flags(scratch: Path) -> list[str]:
        import json

        path = _checkpoint(scratch / "checkpoints")
        state = path / "state.json"
        state.write_text(json.dumps(edit(json.loads(state.read_text()))))
        return ["--resume", str(path)]
    return flags


def _rename_tensor_ref(doc: dict) -> dict:
    doc["state"]["lora"]["unet"]["w"]["__tensor__"] = "s.lora.unet.q"  # names a tensor the file does not hold
    return doc


def _run_folder(scratch: Path) -> list[str]:
    _checkpoint(scratch / "lora_run" / "checkpoints")
    return ["--resume", str(scratch / "lora_run")]


BIG = 2**70  # past every 64-bit seed

CONFIG_CASES = [
    ConfigCase("device not a device", lambda s: ["--device", "bogus"], "train.device = 'bogus' is not a device"),
    ConfigCase("device cuda without CUDA", lambda s: ["--device", "cuda"],
               "train.device = 'cuda': there is no CUDA device here", without_cuda=True),
    ConfigCase("device cuda:7", lambda s: ["--device", "cuda:7"], "train.device = 'cuda:7': there is no CUDA device"),
    ConfigCase("fp16 on the CPU", lambda s: ["--device", "cpu", "--precision", "fp16"],
               "train.precision = 'fp16' does not run on the CPU. Use --precision fp32 (or bf16"),
    ConfigCase("fp16 where the device is the CPU", lambda s: ["--precision", "fp16"], "does not run on the CPU",
               without_cuda=True),
    ConfigCase("clip skip deeper than the text encoder", lambda s: ["--clip-skip", "50"],
               "model.clip_skip = 50 is out of range for tiny-sd1, whose text encoder has 2 layers. "
               "Use a clip skip from 1 to 2"),
    ConfigCase("clip skip deeper than any text encoder", lambda s: ["--clip-skip", "500"],
               "model.clip_skip = 500 is out of range"),
    ConfigCase("seed past 64 bits", lambda s: ["--seed", str(BIG)],
               f"train.seed = {BIG} is out of range. Use a seed from 0 to 4294967295"),
    ConfigCase("sample seed past 64 bits", lambda s: ["--sample-seed", str(BIG)], f"output.sample_seed = {BIG}"),
    ConfigCase("config is a folder", lambda s: ["--config", str(s)], "is a folder, not a config file"),
    ConfigCase("resume: state.json is a list", _mangled(lambda doc: [doc]), "is damaged (state.json holds a list"),
    ConfigCase("resume: state.json has no step", _mangled(lambda doc: {k: v for k, v in doc.items() if k != "step"}),
               "is damaged (its step is None"),
    ConfigCase("resume: a key mangled in state.json", _mangled(_rename_tensor_ref), "is damaged (KeyError"),
    ConfigCase("resume: the run folder, not a checkpoint", _run_folder,
               "It holds checkpoints: use --resume"),
    ConfigCase("bad TOML syntax", _toml("[network\nrank = 8\n"), "is not valid TOML"),
    ConfigCase("TOML not UTF-8", _toml(b"[network]\nrank = 8 # \xff\xfe\n"), "is not UTF-8"),
    ConfigCase("TOML misspelt setting", _toml("[network]\nrnak = 8\n"), "Did you mean 'rank'?"),
    ConfigCase("TOML setting outside its section", _toml("rank = 8\n"), "Put it under [network]"),
    ConfigCase("TOML wrong type", _toml("[network]\nrank = 'big'\n"), "network.rank must be a whole number"),
    ConfigCase("TOML NaN learning rate", _toml("[optim]\nlr = nan\n"), "optim.lr must be a finite number"),
    ConfigCase("rank 0", lambda s: ["--rank", "0"], "network.rank = 0 is out of range"),
    ConfigCase("rank 5000", lambda s: ["--rank", "5000"], "1024 or less"),
    ConfigCase("negative learning rate", lambda s: ["--lr=-1e-4"], "optim.lr = -0.0001 is out of range"),
    ConfigCase("batch size 0", lambda s: ["--batch-size", "0"], "train.batch_size = 0"),
    ConfigCase("caption dropout 1.5", lambda s: ["--caption-dropout", "1.5"], "data.caption_dropout = 1.5"),
    ConfigCase("resolution not a multiple of the model's 64", lambda s: ["--resolution", "100"],
               "data.resolution = 100 is not a multiple of 64, which this model needs. Use 64 or 128."),
    ConfigCase("resolution below 64", lambda s: ["--resolution", "32"], "at least 64 pixels"),
    ConfigCase("output not .safetensors", lambda s: ["--output", str(s / "lora.ckpt")], ".safetensors extension"),
    ConfigCase("output under a file", _file_where_a_folder_goes, "Could not write"),
    ConfigCase("base model missing", lambda s: ["--base", str(s / "nope.safetensors")], "Base model not found"),
    ConfigCase("base model is a pickle", _fake_base("model.ckpt", b"\x80\x04\x95 not really"), "is a pickle"),
    ConfigCase("base model is garbage", _fake_base("model.safetensors", b"\x10\0\0\0\0\0\0\0garbage!"),
               "model.safetensors cannot be read"),
    ConfigCase("resume from a missing checkpoint", lambda s: ["--resume", str(s / "step-000010")],
               "No checkpoint folder at"),
]


@pytest.mark.parametrize("case", CONFIG_CASES, ids=[c.name for c in CONFIG_CASES])
def test_bad_settings_end_with_one_clear_line(case: ConfigCase, tmp_path: Path, tiny_sd1_dir: Path,
                                              image_folder: Path, capsys) -> None:
    """Through the CLI (main) and, for the same argv, the engine's own validation and setup."""
    if case.without_cuda and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    argv = ["train", "--base", str(tiny_sd1_dir), "--data", str(image_folder), "--preset", "character-lite",
            "--steps", "1", "--output", str(tmp_path / "out" / "lora.safetensors"), *case.flags(scratch)]
    code, out, err = _cli(argv, capsys)
    assert code == 2
    _one_error_line(err, case.words)
    assert not (tmp_path / "out" / "lora.safetensors").exists()

    from trainer.cli.main import build_parser
    from trainer.cli.train import config_overrides
    from trainer.config.presets import resolve_config
    from trainer.train.events import RunStarted
    from trainer.train.loop import train

    args = build_parser().parse_args(argv)
    with pytest.raises(StudioError, match=_escaped(case.words)):
        config = resolve_config(args.preset, args.config, config_overrides(args))
        for event in train(config):
            if isinstance(event, RunStarted):
                break


def _escaped(words: str) -> str:
    import re

    return re.escape(words)


# --- every command's device, precision, index and path flags, through the real console -----------


@dataclass(frozen=True)
class CommandCase:
    name: str
    argv: Callable[[Path, Path], list[str]]  # (scratch folder, tiny model) -> the command line after the program
    words: str
    without_cuda: bool = False  # about a machine without CUDA (skipped where there is a GPU)


def _generate(*flags: str) -> Callable[[Path, Path], list[str]]:
    return lambda scratch, model: ["generate", "--base", str(model), "--prompt", "zxq", "--steps", "1",
                                   "--out", str(scratch / "images"), *flags]


def _train(*flags: str) -> Callable[[Path, Path], list[str]]:
    def argv(scratch: Path, model: Path) -> list[str]:
        from conftest import write_captioned_images

        data = write_captioned_images(scratch / "set", [(64, 64)] * 2, "zxq, picture {i}")
        return ["train", "--base", str(model), "--data", str(data), "--preset", "character-lite", "--steps", "1",
                "--output", str(scratch / "images" / "lora.safetensors"), *flags]
    return argv


def _empty_folder(scratch: Path) -> str:
    (scratch / "loras").mkdir(exist_ok=True)
    return str(scratch / "loras")


COMMAND_CASES = [
    CommandCase("generate --device bogus", _generate("--device", "bogus"), "--device bogus is not a device. Use auto, cpu"),
    CommandCase("generate --device cuda without CUDA", _generate("--device", "cuda"),
                "--device cuda: there is no CUDA device here", without_cuda=True),
    CommandCase("generate --device cuda:7", _generate("--device", "cuda:7"), "--device cuda:7: there is no CUDA device"),
    CommandCase("generate --clip-skip 50", _generate("--clip-skip", "50"),
                "clip skip = 50 is out of range for tiny-sd1, whose text encoder has 2 layers. Use a clip skip from 1 to 2"),
    CommandCase("generate --clip-skip 0", _generate("--clip-skip", "0"), "The clip skip must be at least 1"),
    CommandCase("generate --seed past 64 bits", _generate("--seed", str(BIG)),
                "The seed must be -1 (random) or a number from 0 to 2^63-1"),
    CommandCase("generate --lora a folder", lambda s, m: _generate("--lora", f"{_empty_folder(s)}:0.8")(s, m),
                "is a folder, and holds no PEFT adapter"),
    CommandCase("generate --lora missing", lambda s, m: _generate("--lora", str(s / "typo.safetensors"))(s, m),
                "LoRA file not found"),
    CommandCase("reg-images --device bogus",
                lambda s, m: ["reg-images", "--base", str(m), "--class-prompt", "a cat", "-n", "1", "--out",
                              str(s / "images"), "--device", "bogus"], "--device bogus is not a device"),
    CommandCase("caption --device bogus", lambda s, m: ["caption", str(s), "--tagger", str(s / "tagger"), "--device",
                                                        "cuda:x"], "--device cuda:x is not a device"),
    CommandCase("bake --lora a folder", lambda s, m: ["bake", "--base", str(m), "--lora", _empty_folder(s), "--out",
                                                      str(s / "images" / "baked.safetensors")],
                "is a folder, and holds no PEFT adapter"),
    CommandCase("inspect a folder", lambda s, m: ["inspect", _empty_folder(s)], "is a folder, and holds no PEFT adapter"),
    CommandCase("train --device cuda:7", _train("--device", "cuda:7"), "train.device = 'cuda:7': there is no CUDA device"),
    CommandCase("train --device bogus", _train("--device", "bogus"), "train.device = 'bogus' is not a device"),
    CommandCase("train --precision fp16 on the CPU", _train("--device", "cpu", "--precision", "fp16"),
                "train.precision = 'fp16' does not run on the CPU"),
    CommandCase("train --clip-skip 50", _train("--clip-skip", "50"), "model.clip_skip = 50 is out of range for tiny-sd1"),
    CommandCase("train --check --clip-skip 50", _train("--check", "--clip-skip", "50"), "Use a clip skip from 1 to 2"),
    CommandCase("train --seed past 64 bits", _train("--seed", str(BIG)), "Use a seed from 0 to 4294967295"),
    CommandCase("train --config a folder", lambda s, m: _train("--config", str(s))(s, m), "is a folder, not a config file"),
]


@pytest.mark.parametrize("case", COMMAND_CASES, ids=[c.name for c in COMMAND_CASES])
def test_command_case_in_a_subprocess(case: CommandCase, tmp_path: Path, tiny_sd1_dir: Path) -> None:
    """``python -m trainer.cli ...`` as a user runs it: exit code 2, one error line, no traceback, nothing written."""
    if case.without_cuda and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    command = [sys.executable, "-m", "trainer.cli", *case.argv(tmp_path, tiny_sd1_dir)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=child_env())
    assert "Traceback" not in done.stdout + done.stderr, done.stderr[-3000:]
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    _one_error_line(done.stderr, case.words)
    assert not (tmp_path / "images").exists() or not any((tmp_path / "images").iterdir())


# --- LoRA file cases -----------------------------------------------------------------------------

STEM = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"


@dataclass(frozen=True)
class LoraCase:
    name: str
    write: Callable[[Path], Path]  # writes the file into a folder, returns its path
    words: str
    inspect_ok: bool = False  # the file itself is fine; only this model refuses it


def _tensors(name: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None):
    def write(folder: Path) -> Path:
        path = folder / name
        safetensors.torch.save_file(tensors, str(path), metadata)
        return path
    return write


def _good_bytes() -> bytes:
    return safetensors.torch.save({f"{STEM}.lora_down.weight": torch.randn(4, 768).half(),
                                   f"{STEM}.lora_up.weight": torch.randn(320, 4).half(),
                                   f"{STEM}.alpha": torch.tensor(4.0).half()})


def _raw(name: str, make: Callable[[], bytes]) -> Callable[[Path], Path]:
    def write(folder: Path) -> Path:
        path = folder / name
        path.write_bytes(make())
        return path
    return write


def _torch_pickle(name: str) -> Callable[[Path], Path]:
    def write(folder: Path) -> Path:
        torch.save({f"{STEM}.lora_down.weight": torch.zeros(4, 768)}, folder / name)
        return folder / name
    return write


def _pair(rank_down: int, rank_up: int, dtype=torch.float16, fill: float | None = None) -> dict[str, torch.Tensor]:
    down, up = torch.randn(rank_down, 768).to(dtype), torch.randn(320, rank_up).to(dtype)
    if fill is not None:
        down.fill_(fill)
    return {f"{STEM}.lora_down.weight": down, f"{STEM}.lora_up.weight": up}


SDXL_STEM = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"

LORA_CASES = [
    LoraCase("pickle .ckpt", _torch_pickle("evil.ckpt"), "is a pickle"),
    LoraCase("pickle renamed .safetensors", _torch_pickle("renamed.safetensors"), "is a pickle"),
    LoraCase("zero-byte file", _raw("empty.safetensors", lambda: b""), "only 0 bytes long"),
    LoraCase("truncated download", _raw("cut.safetensors", lambda: _good_bytes()[:-100]), "looks truncated"),
    LoraCase("header length beyond the file", _raw("long.safetensors", lambda: struct.pack("<Q", 5000) + b'{"a":1}'),
             "claim a header longer than the whole file (15 bytes)"),
    LoraCase("header over 100 MB", _raw("huge.safetensors", lambda: struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{}"),
             "over the 100 MB limit"),
    LoraCase("header not JSON", _raw("junk.safetensors", lambda: struct.pack("<Q", 8) + b"{not js}"), "not valid JSON"),
    LoraCase("tensor claims more bytes than the file holds",
             _raw("greedy.safetensors", lambda: _header_claiming(shape=[100_000, 100_000])), "needs bytes up to"),
    LoraCase("integer weights", _tensors("ints.safetensors", _pair(4, 4, torch.int32)), "floating point"),
    LoraCase("NaN weights", _tensors("nan.safetensors", _pair(4, 4, fill=float("nan"))), "NaN or infinite"),
    LoraCase("missing lora_up", _tensors("half.safetensors", {f"{STEM}.lora_down.weight": torch.randn(4, 768)}),
             "has a lora_down weight but no lora_up"),
    LoraCase("rank differs between up and down", _tensors("ranks.safetensors", _pair(4, 2)),
             "rank 4 in lora_down but 2 in lora_up"),
    LoraCase("SDXL LoRA on an SD1 model",
             _tensors("xl.safetensors", {f"{SDXL_STEM}.lora_down.weight": torch.randn(4, 2048).half(),
                                         f"{SDXL_STEM}.lora_up.weight": torch.randn(640, 4).half()}),
             "made for SDXL but the loaded model is SD 1.x", inspect_ok=True),
    LoraCase("SD1 LoRA whose shapes do not fit this model", _tensors("sd15.safetensors", _pair(4, 4)),
             "does not fit this model", inspect_ok=True),
    LoraCase("LyCORIS LoHa", _tensors("loha.safetensors", {f"{STEM}.hada_w1_a": torch.zeros(4, 8),
                                                          f"{STEM}.hada_w1_b": torch.zeros(4, 8)}), "LoHa"),
    LoraCase("overlapping tensor offsets", _raw("overlap.safetensors", lambda: overlapping(_good_bytes())),
             "the byte ranges of its tensors overlap"),
    LoraCase("alpha 0", _tensors("alpha0.safetensors", {**_pair(4, 4), f"{STEM}.alpha": torch.tensor(0.0)}),
             "has alpha 0; a LoRA's strength is alpha / rank"),
    LoraCase("negative alpha", _tensors("alphaneg.safetensors", {**_pair(4, 4), f"{STEM}.alpha": torch.tensor(-4.0)}),
             "has alpha -4; a LoRA's strength is alpha / rank"),
]


def overlapping(raw: bytes) -> bytes:
    """A safetensors file whose second tensor's byte range points into the first's (the spec forbids it)."""
    import json

    length = struct.unpack("<Q", raw[:8])[0]
    header, data = json.loads(raw[8:8 + length]), raw[8 + length:]
    first, second = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])[:2]
    begin, end = header[second]["data_offsets"]
    start = header[first]["data_offsets"][0]
    header[second]["data_offsets"] = [start, start + end - begin]  # same size, other tensor's bytes
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def _header_claiming(shape: list[int]) -> bytes:
    header = f'{{"{STEM}.lora_down.weight":{{"dtype":"F16","shape":{shape},"data_offsets":[0,{2 * shape[0] * shape[1]}]}}}}'
    raw = header.encode()
    return struct.pack("<Q", len(raw)) + raw + b"\0" * 64


@pytest.fixture(scope="module")
def generator(tiny_sd1_dir: Path):
    from trainer.generate.generator import Generator

    return Generator.from_base(str(tiny_sd1_dir), device="cpu")


@pytest.fixture
def no_unpickling(monkeypatch):
    """Any attempt to unpickle fails the test loudly."""
    def refuse(*args, **kwargs):
        raise AssertionError("something tried to unpickle a file")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)


@pytest.mark.parametrize("case", LORA_CASES, ids=[c.name for c in LORA_CASES])
def test_lora_file_case_in_the_generate_path(case: LoraCase, tmp_path: Path, generator, tiny_sd1_dir: Path,
                                             no_unpickling, capsys) -> None:
    from trainer.generate.requests import GenerationRequest, LoraSpec

    path = case.write(tmp_path)
    size = path.stat().st_size
    tracemalloc.start()
    try:
        if not case.inspect_ok:
            with pytest.raises(StudioError, match=_escaped(case.words)):
                read_lora_file(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * size + 2_000_000, f"reading a {size}-byte file allocated {peak} bytes"

    with pytest.raises(StudioError, match=_escaped(case.words)) as caught:
        generator.prepare(GenerationRequest(prompt="zxq", loras=(LoraSpec(path),)))
    assert path.name in str(caught.value) and caught.value.hint

    code, out, err = _cli(["generate", "--base", str(tiny_sd1_dir), "--lora", f"{path}:0.8", "--prompt", "zxq",
                           "--steps", "1", "--out", str(tmp_path / "images")], capsys)
    assert code == 2
    _one_error_line(err, case.words)
    assert not (tmp_path / "images").exists() or not any((tmp_path / "images").iterdir())

    code, out, err = _cli(["inspect", str(path)], capsys)
    assert code == (0 if case.inspect_ok else 2)
    if not case.inspect_ok:
        _one_error_line(err, case.words)


def test_good_control_files_pass_the_same_paths(tmp_path: Path, tiny_sd1_dir: Path, capsys) -> None:
    """The corpus fails for the reasons given, not because the paths refuse everything."""
    for i in range(2):
        picture(tmp_path / "set" / f"good{i}.png", f"zxq, good picture {i}", seed=100 + i)
    code, out, _ = _cli(["train", "--check", "--base", str(tiny_sd1_dir), "--data", str(tmp_path / "set")], capsys)
    assert code == 0 and "2 usable images of 2" in out
    good = _raw("good.safetensors", _good_bytes)(tmp_path)
    assert read_lora_file(good).family == "sd1"
    code, out, _ = _cli(["inspect", str(good)], capsys)
    assert code == 0 and "SD 1.x" in out


# --- overlapping offsets in every file LoRA Studio opens (issue 19, item 5) ----------------------

OVERLAP = "the byte ranges of its tensors overlap"
TINY_STEM = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"  # 32 -> 32 in the tiny model


def _tiny_lora(folder: Path, name: str = "tiny.safetensors", width: int = 32, metadata=None) -> Path:
    path = folder / name
    safetensors.torch.save_file({f"{TINY_STEM}.lora_down.weight": torch.randn(2, width),
                                 f"{TINY_STEM}.lora_up.weight": torch.randn(32, 2),
                                 f"{TINY_STEM}.alpha": torch.tensor(2.0)}, str(path), metadata)
    return path


def _overlap_in_place(path: Path) -> Path:
    path.write_bytes(overlapping(path.read_bytes()))
    return path


def _single_file_base(scratch: Path, tiny: Path) -> str:
    from trainer.config.schema import ModelConfig
    from trainer.models.loading import load_base_model
    from trainer.models.single_file import save_single_file

    path = scratch / "base.safetensors"
    save_single_file(load_base_model(ModelConfig(base=str(tiny))), path)
    return str(_overlap_in_place(path))


def _folder_base(scratch: Path, tiny: Path) -> str:
    import shutil

    folder = scratch / "base"
    shutil.copytree(tiny, folder)
    _overlap_in_place(folder / "unet" / "diffusion_pytorch_model.safetensors")
    return str(folder)


@pytest.mark.parametrize("make_base", [_single_file_base, _folder_base], ids=["single file", "diffusers folder"])
@pytest.mark.parametrize("command", ["generate", "bake", "extract", "train"])
def test_a_base_model_with_overlapping_offsets_is_refused(make_base, command: str, tmp_path: Path,
                                                         tiny_sd1_dir: Path, image_folder: Path, capsys) -> None:
    base = make_base(tmp_path, tiny_sd1_dir)
    lora = _tiny_lora(tmp_path)
    argv = {"generate": ["generate", "--base", base, "--lora", f"{lora}:1", "--prompt", "zxq", "--steps", "1",
                         "--out", str(tmp_path / "images")],
            "bake": ["bake", "--base", base, "--lora", f"{lora}:1", "--out", str(tmp_path / "baked.safetensors")],
            "extract": ["extract", "--base", str(tiny_sd1_dir), "--tuned", base, "--out", str(tmp_path / "x.safetensors")],
            "train": ["train", "--preset", "character-lite", "--base", base, "--data", str(image_folder), "--steps", "1",
                      "--output", str(tmp_path / "run" / "lora.safetensors")]}[command]
    code, _, err = _cli(argv, capsys)
    assert code == 2
    _one_error_line(err, OVERLAP)


def test_a_checkpoint_with_overlapping_offsets_is_refused(tmp_path: Path, tiny_sd1_dir: Path, image_folder: Path,
                                                         capsys) -> None:
    from trainer.train.checkpoints import TENSORS_FILE, save_checkpoint

    checkpoint = save_checkpoint(tmp_path / "checkpoints", 2, {"a": torch.ones(8), "b": torch.zeros(8)}, keep_last=1)
    _overlap_in_place(checkpoint / TENSORS_FILE)
    code, _, err = _cli(["train", "--preset", "character-lite", "--base", str(tiny_sd1_dir), "--data", str(image_folder),
                         "--steps", "4", "--output", str(tmp_path / "run" / "lora.safetensors"),
                         "--resume", str(checkpoint)], capsys)
    assert code == 2
    _one_error_line(err, OVERLAP)
    assert str(checkpoint) in err and "resume from an earlier one" in err


# --- LoRAs checked against the base they are used with (issue 19, item 5) ------------------------

SDXL_TE2 = "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"


def _sdxl_lora(folder: Path) -> Path:
    path = folder / "xl.safetensors"
    safetensors.torch.save_file({f"{SDXL_TE2}.lora_down.weight": torch.randn(4, 1280),
                                 f"{SDXL_TE2}.lora_up.weight": torch.randn(1280, 4),
                                 f"{SDXL_TE2}.alpha": torch.tensor(4.0)}, str(path))
    return path


def _too_wide(folder: Path) -> Path:
    return _tiny_lora(folder, "wide.safetensors", width=48)  # the tiny model's layer takes 32


def _tool_argv(command: str, lora: Path, base: Path, out: Path) -> list[str]:
    return {"inspect": ["inspect", str(lora), "--base", str(base)],
            "resize": ["resize", str(lora), "--rank", "1", "--out", str(out / "r.safetensors"), "--base", str(base)],
            "merge": ["merge", f"{lora}:1", "--out", str(out / "m.safetensors"), "--base", str(base)],
            "generate": ["generate", "--base", str(base), "--lora", f"{lora}:1", "--prompt", "zxq", "--steps", "1",
                         "--out", str(out / "images")],
            "bake": ["bake", "--base", str(base), "--lora", f"{lora}:1", "--out", str(out / "b.safetensors")]}[command]


TOOLS = ["inspect", "resize", "merge", "generate", "bake"]
BASE_MISFITS = [
    ("SDXL LoRA with an SD1 base", _sdxl_lora, "made for SDXL but the loaded model is SD 1.x"),
    ("a layer wider than the base's", _too_wide, "does not fit this model"),
]


@pytest.mark.parametrize("command", TOOLS)
@pytest.mark.parametrize(("write", "words"), [c[1:] for c in BASE_MISFITS], ids=[c[0] for c in BASE_MISFITS])
def test_every_tool_refuses_a_lora_that_does_not_fit_the_base(command: str, write, words: str, tmp_path: Path,
                                                              tiny_sd1_dir: Path, capsys) -> None:
    lora = write(tmp_path)
    code, _, err = _cli(_tool_argv(command, lora, tiny_sd1_dir, tmp_path), capsys)
    assert code == 2
    _one_error_line(err, words)
    assert not [p for p in tmp_path.rglob("*") if p.suffix in (".safetensors", ".png") and p != lora]


@pytest.mark.parametrize("command", ["inspect", "resize", "merge", "generate", "bake"])
def test_a_lora_that_fits_passes_every_tool(command: str, tmp_path: Path, tiny_sd1_dir: Path, capsys) -> None:
    lora = _tiny_lora(tmp_path)
    code, out, err = _cli(_tool_argv(command, lora, tiny_sd1_dir, tmp_path), capsys)
    assert code == 0, err
    if command == "inspect":
        assert "Checked against tiny-sd1 (SD 1.x): 1 layer fits." in out


def _sd15_file(folder: Path, odd_width: int | None) -> Path:
    """A real-width SD 1.x LoRA (cross-attention 768); with ``odd_width`` one more layer of that input width."""
    tensors = {f"{STEM}.lora_down.weight": torch.randn(4, 768), f"{STEM}.lora_up.weight": torch.randn(320, 4),
               f"{STEM}.alpha": torch.tensor(4.0)}
    if odd_width:
        q = STEM.replace("attn2_to_k", "attn1_to_q")
        tensors |= {f"{q}.lora_down.weight": torch.randn(4, odd_width), f"{q}.lora_up.weight": torch.randn(320, 4)}
    path = folder / f"sd15-{odd_width}.safetensors"
    safetensors.torch.save_file(tensors, str(path))
    return path


@pytest.mark.parametrize("command", ["inspect", "resize"])
def test_without_a_base_the_family_layout_is_checked_and_named(command: str, tmp_path: Path, capsys) -> None:
    argv = {"inspect": ["inspect"], "resize": ["resize", "--rank", "2", "--out", str(tmp_path / "r.safetensors")]}
    code, _, err = _cli([*argv[command], str(_sd15_file(tmp_path, 999))], capsys)
    assert code == 2
    _one_error_line(err, "attn1_to_q is 999 -> 320 but the model's layer is 320 -> 320 (checked against the bundled")
    assert "checked against the bundled SD 1.x layout (no base model given" in err
    code, out, _ = _cli(["inspect", str(_sd15_file(tmp_path, None))], capsys)
    assert code == 0 and "Checked against the bundled SD 1.x layout" in out


def test_the_console_script_refuses_an_sdxl_lora_on_an_sd1_base(tmp_path: Path, tiny_sd1_dir: Path) -> None:
    result = subprocess.run([sys.executable, "-c", "from app.cli import main; raise SystemExit(main())",
                             "inspect", str(_sdxl_lora(tmp_path)), "--base", str(tiny_sd1_dir)],
                            env=child_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "made for SDXL but the loaded model is SD 1.x" in result.stderr


# --- outputs that would replace an input, or are not the kind of file written ---------------------


def _single_file(folder: Path, name: str = "model.safetensors") -> Path:
    """A file where a single-file checkpoint goes (these checks run before anything is loaded)."""
    path = folder / name
    path.write_bytes(b"\x10\0\0\0\0\0\0\0" + b'{"a":"b"}       ')
    return path


OUTPUT_CASES = [  # (name, argv from (scratch, LoRA, tiny model), words)
    ("resize --out is its input", lambda s, lora, m: ["resize", str(lora), "--rank", "1", "--out", str(lora)],
     ("The resized LoRA {lora} is the LoRA file it reads; writing there would replace that file. "
      "Choose a new name for the output.")),
    ("resize --out the input through ..", lambda s, lora, m: ["resize", str(lora), "--rank", "1", "--out",
                                                               str(s / ".." / s.name / lora.name)],
     "is the LoRA file it reads"),
    ("merge --out is one of its inputs", lambda s, lora, m: ["merge", f"{lora}:0.5", f"{_tiny_lora(s, 'b.safetensors')}:1",
                                                              "--out", str(s / "b.safetensors")],
     "The merged LoRA {scratch}/b.safetensors is the LoRA file it reads"),
    ("bake --out is the LoRA baked in", lambda s, lora, m: ["bake", "--base", str(m), "--lora", f"{lora}:1", "--out",
                                                             str(lora)],
     "The checkpoint {lora} is the LoRA file it reads"),
    ("bake --out is the base checkpoint", lambda s, lora, m: ["bake", "--base", str(_single_file(s)), "--lora",
                                                               f"{lora}:1", "--out", str(s / "model.safetensors")],
     "The checkpoint {scratch}/model.safetensors is the base model it reads"),
    ("extract --out is the tuned checkpoint", lambda s, lora, m: ["extract", "--base", str(m), "--tuned",
                                                                   str(_single_file(s)), "--out",
                                                                   str(s / "model.safetensors")],
     "The extracted LoRA {scratch}/model.safetensors is the fine-tuned model it reads"),
    ("inspect --plot is the LoRA", lambda s, lora, m: ["inspect", str(lora), "--plot", str(lora)],
     "The plot must be a .png file, not tiny.safetensors. Name it with the .png extension, e.g. tiny.png."),
    ("grid --out is the LoRA", lambda s, lora, m: ["grid", "--base", str(m), "--lora", str(lora), "--prompt", "zxq",
                                                    "--steps", "1", "--out", str(lora)],
     "The grid picture must be a .png file, not tiny.safetensors"),
    ("resize --out .ckpt", lambda s, lora, m: ["resize", str(lora), "--rank", "1", "--out", str(s / "small.ckpt")],
     ("The resized LoRA must be a .safetensors file, not small.ckpt. Name it with the .safetensors extension, "
      "e.g. small.safetensors.")),
    ("merge --out a picture", lambda s, lora, m: ["merge", str(lora), "--out", str(s / "img00.png")],
     "The merged LoRA must be a .safetensors file, not img00.png"),
    ("extract --out .pt", lambda s, lora, m: ["extract", "--base", str(m), "--tuned", str(m), "--out",
                                              str(s / "diff.pt")], "The extracted LoRA must be a .safetensors file"),
    ("resize --out a folder", lambda s, lora, m: ["resize", str(lora), "--rank", "1", "--out", str(s)],
     "The resized LoRA {scratch} is a folder. Name the file to write, e.g. {scratch}/name.safetensors."),
    ("grid --out a folder", lambda s, lora, m: ["grid", "--base", str(m), "--lora", str(lora), "--prompt", "zxq",
                                                 "--steps", "1", "--out", str(s)], "The grid picture {scratch} is a folder"),
]


@pytest.mark.parametrize(("argv", "words"), [c[1:] for c in OUTPUT_CASES], ids=[c[0] for c in OUTPUT_CASES])
def test_an_output_that_would_replace_an_input_or_is_the_wrong_kind_is_refused(argv, words: str, tmp_path: Path,
                                                                               tiny_sd1_dir: Path, capsys) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    lora = _tiny_lora(scratch)
    argv = argv(scratch, lora, tiny_sd1_dir)
    before = {p: p.read_bytes() for p in scratch.iterdir()}
    code, out, err = _cli(argv, capsys)
    assert code == 2, out + err
    _one_error_line(err, words.format(lora=lora, scratch=scratch))
    assert {p: p.read_bytes() for p in scratch.iterdir()} == before, "no input changed, nothing new written"


def test_train_refuses_to_save_the_lora_over_its_base_checkpoint(tmp_path: Path, image_folder: Path, capsys) -> None:
    base = _single_file(tmp_path)
    content = base.read_bytes()
    code, out, err = _cli(["train", "--preset", "character-lite", "--base", str(base), "--data", str(image_folder),
                           "--steps", "1", "--output", str(image_folder / ".." / base.name)], capsys)
    assert code == 2, out + err
    _one_error_line(err, f"output.output = '{image_folder}/../model.safetensors' is the base model's file; saving the "
                         "LoRA there would replace the checkpoint. Choose another output file")
    assert base.read_bytes() == content
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "model.safetensors"]


def test_train_refuses_an_output_inside_the_dataset_folder(tmp_path: Path, tiny_sd1_dir: Path, capsys) -> None:
    """The run's samples and the file's preview there would be training pictures on the next run."""
    data = tmp_path / "pictures"
    picture(data / "img00.png", "zxq, red")
    before = sorted(p.name for p in data.rglob("*"))
    code, out, err = _cli(["train", "--preset", "character-lite", "--base", str(tiny_sd1_dir), "--data", str(data),
                           "--steps", "1", "--output", str(data / "loras" / "zxq.safetensors")], capsys)
    assert code == 2, out + err
    _one_error_line(err, f"is inside the dataset folder {data}; the run's sample pictures and the file's preview "
                         "would be read as training pictures next time. Save the LoRA outside the dataset folder")
    assert sorted(p.name for p in data.rglob("*")) == before


# --- flags whose value is of the wrong kind, through main() -------------------------------------

ODD_VALUE_CASES = [  # (name, argv from (scratch, LoRA, tiny model), words)
    ("generate --out is a file", lambda s, lora, m: ["generate", "--base", str(m), "--prompt", "zxq", "--steps", "1",
                                                      "--out", str(lora)],
     "The image folder {lora} is a file, not a folder. Give a folder (it is made if missing)"),
    ("generate --out under a file", lambda s, lora, m: ["generate", "--base", str(m), "--prompt", "zxq", "--steps", "1",
                                                         "--out", str(lora / "images")],
     "The image folder {lora}/images cannot be made: {lora} is a file."),
    ("reg-images --out is a file", lambda s, lora, m: ["reg-images", "--base", str(m), "--class-prompt", "a cat", "-n",
                                                        "1", "--steps", "1", "--out", str(lora)],
     "The regularization folder {lora} is a file, not a folder."),
    ("grid --prompt-file is a folder", lambda s, lora, m: ["grid", "--base", str(m), "--lora", str(lora),
                                                            "--prompt-file", str(s), "--steps", "1", "--out",
                                                            str(s / "grid.png")],
     "{scratch} is a folder, not a prompt file. Give a .txt file with one prompt a line."),
    ("generate --lora FILE:abc", lambda s, lora, m: ["generate", "--base", str(m), "--prompt", "zxq", "--steps", "1",
                                                      "--lora", f"{lora}:abc", "--out", str(s / "images")],
     "--lora {lora}:abc: the weight 'abc' is not a number. Give FILE:WEIGHT, e.g. {lora}:0.8."),
    ("merge FILE:abc", lambda s, lora, m: ["merge", f"{lora}:abc", "--out", str(s / "m.safetensors")],
     "the weight 'abc' is not a number"),
    ("generate --width 7", lambda s, lora, m: ["generate", "--base", str(m), "--prompt", "zxq", "--steps", "1",
                                                "--width", "7", "--out", str(s / "images")],
     "The width 7 is not a multiple of 8, which this model needs. Use 8 (or another multiple of 8)."),
    ("tags --top -1", lambda s, lora, m: ["tags", str(s), "--top", "-1"],
     "--top -1 prints no rows. Give the number of rows to print, 1 or more (default 40)."),
    ("generate --height 100000", lambda s, lora, m: ["generate", "--base", str(m), "--prompt", "zxq", "--steps", "1",
                                                      "--height", "100000", "--out", str(s / "images")],
     "The height 100000 is larger than 4096 px, more than one pass renders. Render at the model's size (64×64)"),
    ("train --preset missing.toml", lambda s, lora, m: ["train", "--base", str(m), "--data", str(s),
                                                         "--preset", str(s / "mine.toml")],
     "The preset file {scratch}/mine.toml does not exist. Check the path, or use a built-in preset: "),
    ("train --reg-data FILE", lambda s, lora, m: ["train", "--base", str(m), "--data", str(s), "--steps", "1",
                                                   "--reg-data", str(lora), "--output", str(s.parent / "out.safetensors")],
     "The regularization folder {lora} is a file, not a folder. Point --reg-data at the folder"),
]


@pytest.mark.parametrize(("argv", "words"), [c[1:] for c in ODD_VALUE_CASES], ids=[c[0] for c in ODD_VALUE_CASES])
def test_a_flag_value_of_the_wrong_kind_ends_with_one_clear_line(argv, words: str, tmp_path: Path, tiny_sd1_dir: Path,
                                                                 capsys) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    lora = _tiny_lora(scratch)
    picture(scratch / "img00.png", "zxq, red")
    argv = argv(scratch, lora, tiny_sd1_dir)
    before = {p: p.read_bytes() for p in scratch.iterdir()}
    code, out, err = _cli(argv, capsys)
    assert code == 2, out + err
    _one_error_line(err, words.format(lora=lora, scratch=scratch))
    assert {p: p.read_bytes() for p in scratch.iterdir()} == before


def test_running_out_of_memory_while_generating_names_the_size(tmp_path: Path, tiny_sd1_dir: Path, capsys,
                                                              monkeypatch) -> None:
    """The CPU allocator's error for a picture too large (--width 100000 asks for 40 GB in the first conv)."""
    from diffusers import StableDiffusionPipeline

    def allocate(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 40000000000 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(StableDiffusionPipeline, "__call__", allocate)
    code, out, err = _cli(["generate", "--base", str(tiny_sd1_dir), "--prompt", "zxq", "--steps", "1", "--device", "cpu",
                           "--width", "4096", "--height", "2048", "--out", str(tmp_path / "images")], capsys)
    assert code == 2, out + err
    _one_error_line(err, "Ran out of CPU memory rendering a 4096×2048 picture. Use a smaller size (this model's "
                         "native size is 64×64), or close other programs using the CPU.")
    assert not (tmp_path / "images").exists() or not any((tmp_path / "images").iterdir())


# --- the same corpus through the GUI's endpoints (gradio_client, a real server) ------------------

DEMO_SETTINGS = {"steps": 1, "rank": 4, "alpha": 4, "resolution": 64, "sample_every": 0, "save_every": 0}
# Cases the browser cannot express: a --data path, symlinks, and dotfiles (a browser upload of
# "._name.png" is stored as "_name.png"; the Dataset tab then shows it as an unreadable picture).
# Nor sub-folders (an upload is flat, so kohya's N_name folders are a --data matter), and the app
# refuses a caption file that is not text at the upload (its status names it; test_upload_refuses_a_caption_that_is_not_text).
GUI_SKIPPED = {"data path is a file", "data folder does not exist", "dangling symlink", "macOS ._ resource fork is ignored",
               "kohya 0_ folder is not trained", "kohya -3_ folder is named", "every picture in a 0_ folder",
               "caption with NUL bytes that is not text"}
GUI_DATA_CASES = [c for c in DATA_CASES if c.name not in GUI_SKIPPED]
APP_PORT = 7980  # app_server's first port for this module


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in name).strip("-")[:60]


@pytest.mark.parametrize("case", GUI_DATA_CASES, ids=[c.name for c in GUI_DATA_CASES])
def test_dataset_case_through_the_gui(case: DataCase, tmp_path: Path, app_client) -> None:
    from gradio_client import handle_file

    from app.projects import DEMO_MODEL_CHOICE, safe_name
    from trainer.data.images import image_extensions

    folder = tmp_path / "set"
    _build(case, folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink())
    name = _slug(case.name)
    table, report, issues, status, *_ = app_client.predict(name, [handle_file(p) for p in files], "", 64,
                                                           api_name="/upload_images")
    assert "Traceback" not in report + status
    rows = {row[1]: row for row in table["data"]}
    issue_text = " ".join(" ".join(map(str, row)) for row in issues["data"])

    if case.expect == "error":
        if "Found 0" in case.words or "cannot read" in case.words:  # nothing the app takes as a picture
            message = app_error(app_client.predict, name, DEMO_MODEL_CHOICE, "character-lite", "",
                                 DEMO_SETTINGS, api_name="/start_training")
            assert "Found 0 images" in message
        else:  # pictures that cannot be read: the plan says so before any training
            plan = app_client.predict(name, DEMO_MODEL_CHOICE, "character-lite", "", DEMO_SETTINGS,
                                      api_name="/check_training")
            assert "✖ The dataset has 3 error(s)" in plan  # two unreadable files, and nothing usable
        return

    target = Path(case.target).name
    if Path(target).suffix.lower() not in image_extensions():
        assert f"{target}: not a picture type" in status  # refused at the upload, with the reason
        return
    expect, code = _resolved(case, folder)
    row = rows[safe_name(target)]
    if code in ("few_images",):
        assert case.words in issue_text
    elif code and code != "caption_encoding":  # captions arrive re-encoded as UTF-8: nothing left to warn about
        assert case.words in row[3], row
        assert row[3].startswith("✖" if case.severity == "error" else "⚠"), row
    else:
        assert row[3] == "✔", row
    if "caption" in case.name:  # the grid shows the caption as the engine reads it
        text = (folder / case.target).with_suffix(".txt")
        if text.is_file() and readable(text):
            from trainer.data.captions import read_caption_file

            assert row[2] == read_caption_file(text)[0]


def test_upload_refuses_a_caption_that_is_not_text(tmp_path: Path, app_client) -> None:
    from gradio_client import handle_file

    picture(tmp_path / "nulcap.png", seed=25)
    sidecar(tmp_path / "nulcap.png", b"\0\1\2zxq\0\xff")
    picture(tmp_path / "u16.png", seed=24)
    sidecar(tmp_path / "u16.png", "zxq, déjà vu".encode("utf-16-le"))
    files = [handle_file(tmp_path / name) for name in ("nulcap.png", "nulcap.txt", "u16.png", "u16.txt")]
    table, report, issues, status, *_ = app_client.predict("nul-captions", files, "", 64, api_name="/upload_images")
    assert "Traceback" not in report + status
    assert "nulcap.txt" in status and "is not a text file: it holds NUL bytes" in status, status
    captions = {row[1]: row[2] for row in table["data"]}
    assert captions["nulcap.png"] == "" and captions["u16.png"] == "zxq, déjà vu"


@dataclass(frozen=True)
class PlanCase:
    name: str
    base: str  # "demo": the demo model
    dataset: bool  # a dataset of two good pictures is chosen
    settings: dict
    words: str
    without_cuda: bool = False


PLAN_CASES = [
    PlanCase("nothing chosen", "", False, {}, "No base model is chosen"),
    PlanCase("no base model", "", True, {}, "No base model is chosen"),
    PlanCase("no dataset", "demo", False, {}, "No dataset is chosen"),
    PlanCase("base model path missing", "/nowhere/model.safetensors", True, {}, "Base model not found"),
    PlanCase("device not here", "demo", True, {"device": "cuda:7"}, "train.device = 'cuda:7': there is no CUDA device"),
    PlanCase("device cuda without CUDA", "demo", True, {"device": "cuda"}, "there is no CUDA device here",
             without_cuda=True),
    PlanCase("device bogus", "demo", True, {"device": "bogus"}, "\"Device\" = 'bogus' is not a device"),
    PlanCase("fp16 on the CPU", "demo", True, {"device": "cpu", "precision": "fp16"}, "does not run on the CPU"),
    PlanCase("clip skip deeper than the text encoder", "demo", True, {"clip_skip": 50},
             "whose text encoder has 2 layers. Use a clip skip from 1 to 2"),
    PlanCase("seed past 64 bits", "demo", True, {"seed": BIG}, "Use a seed from 0 to 4294967295"),
]


@pytest.mark.parametrize("case", PLAN_CASES, ids=[c.name for c in PLAN_CASES])
def test_train_tab_checks_its_inputs_before_planning(case: PlanCase, tmp_path: Path, app_server, app_client) -> None:
    """*Check plan* and *Start* answer a bad choice with its message, never an internal error, and
    nothing is queued."""
    from gradio_client import handle_file

    from app.projects import DEMO_MODEL_CHOICE

    if case.without_cuda and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    dataset = ""
    if case.dataset:
        dataset = "plan-" + _slug(case.name)
        for i in range(2):
            picture(tmp_path / f"good{i}.png", f"zxq, good picture {i}", seed=100 + i)
        app_client.predict(dataset, [handle_file(tmp_path / f"good{i}.png") for i in range(2)], "", 64,
                           api_name="/upload_images")
    base = DEMO_MODEL_CHOICE if case.base == "demo" else case.base
    settings = {**DEMO_SETTINGS, **case.settings}
    queued = len(app_server.studio.runs.runs())
    for endpoint in ("/check_training", "/start_training"):
        message = app_error(app_client.predict, dataset, base, "character-lite", "", settings, api_name=endpoint)
        assert case.words in message, f"{endpoint}: {message}"
    assert len(app_server.studio.runs.runs()) == queued, "a refused run is never queued"


@pytest.mark.parametrize("case", LORA_CASES, ids=[c.name for c in LORA_CASES])
def test_lora_file_case_through_the_gui(case: LoraCase, tmp_path: Path, app_server, app_client,
                                       no_unpickling) -> None:
    from gradio_client import handle_file

    from app.projects import DEMO_MODEL_CHOICE

    path = case.write(tmp_path)
    if path.suffix != ".safetensors":
        message = app_error(app_client.predict, [handle_file(path)], api_name="/upload_loras")
        assert ".safetensors" in message  # refused at the upload (gradio's file-type check or the app's)
        return
    *_, status, _ = app_client.predict([handle_file(path)], api_name="/upload_loras")
    stored = app_server.projects.loras_dir / path.name
    assert stored.is_file() and path.name in status
    if case.inspect_ok:
        summary, _ = app_client.predict(str(stored), api_name="/inspect_lora")
        assert path.name in summary
    else:
        assert case.words in app_error(app_client.predict, str(stored), api_name="/inspect_lora")
    message = app_error(app_client.predict, DEMO_MODEL_CHOICE,
                         [{"file": str(stored), "weight": 0.8, "enabled": True}],
                         "zxq", "", 1, 1, 5.0, 0, 0, "Euler a", 1, False, api_name="/generate")
    assert case.words in message


def test_an_unreadable_sub_folder_is_reported_not_silently_skipped(tmp_path: Path, tiny_sd1_dir: Path,
                                                                   monkeypatch, capsys) -> None:
    """chmod 000 does not stop root (these tests may run as root), so the folder is made unreadable
    the way a non-root user meets it: listing it fails with EACCES."""
    import errno

    folder = tmp_path / "set"
    for i in range(5):
        picture(folder / f"good{i}.png", f"zxq, good picture {i}", seed=100 + i)
    picture(folder / "private" / "hidden.png", "zxq, private", seed=120)
    locked = (folder / "private").resolve()
    scandir = os.scandir

    def guarded_scandir(path=".", *args):
        if Path(os.fsdecode(path)).resolve() == locked:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return scandir(path, *args)

    monkeypatch.setattr(os, "scandir", guarded_scandir)
    scan = scan_dataset(DataConfig(data=str(folder)))
    assert len(scan.items) == 5
    issue = next(i for i in scan.issues if i.code == "unreadable_folder")
    assert issue.path.name == "private" and "Permission denied" in issue.message and issue.fix
    code, out, _ = _cli(["train", "--check", "--base", str(tiny_sd1_dir), "--data", str(folder)], capsys)
    assert code == 0 and "Cannot open the folder" in out and "private" in out


@pytest.mark.parametrize(("endpoint", "arguments", "write", "words"), [
    ("/inspect_lora", lambda f: (f,), lambda d: _sd15_file(d, 999), "does not fit this model"),
    ("/resize_lora", lambda f: (f, 2, None, ""), lambda d: _sd15_file(d, 999), "does not fit this model"),
    ("/merge_loras", lambda f: ([f], "", None, ""), lambda d: _sd15_file(d, 999), "does not fit this model"),
    ("/bake_checkpoint", lambda f: ("Demo model (tiny, random: makes noise, for trying the app)", [f], "", ""),
     _sdxl_lora, "made for SDXL but the loaded model is SD 1.x"),
    ("/generate", lambda f: ("Demo model (tiny, random: makes noise, for trying the app)",
                             [{"file": f, "weight": 1.0, "enabled": True}], "zxq", "", 1, 1, 5.0, 0, 0, "Euler a", 1,
                             False), _too_wide, "does not fit this model"),
], ids=["inspect", "resize", "merge", "bake", "generate"])
def test_the_tools_tab_refuses_loras_that_do_not_fit(endpoint: str, arguments, write, words: str, tmp_path: Path,
                                                    app_server, app_client) -> None:
    from gradio_client import handle_file

    path = write(tmp_path)
    app_client.predict([handle_file(path)], api_name="/upload_loras")
    stored = str(app_server.projects.loras_dir / path.name)
    before = set(app_server.projects.outputs_dir.glob("*.safetensors"))
    assert words in app_error(app_client.predict, *arguments(stored), api_name=endpoint)
    assert set(app_server.projects.outputs_dir.glob("*.safetensors")) == before


def _toml_upload(text: str) -> Callable[[Path], list]:
    def write(scratch: Path) -> list:
        from gradio_client import handle_file

        path = scratch / "settings.toml"
        path.write_text(text, encoding="utf-8")
        return [handle_file(path)]
    return write


ODD_ENDPOINT_CASES = [  # (name, endpoint, arguments from the scratch folder, words of the page's message)
    ("run settings of no run", "/run_settings", lambda s: [""],
     "No run is selected. Start a run, or pick one under 'Showing run'."),
    ("run settings of an unknown run id", "/run_settings", lambda s: ["nope"], "No run with id 'nope' in this session."),
    ("settings TOML with a number past 64 bits", "/load_settings", _toml_upload("[train]\nsteps = 100000000000000000000\n"),
     "train.steps = 100000000000000000000 is too large. Use a whole number below 2^63"),
    ("settings that are not a dict", "/save_settings",
     lambda s: ["plan-two", "Demo model (tiny, random: makes noise, for trying the app)", "character-lite", "x", "abc"],
     "The settings must be a dict of setting names and values, not 'abc'."),
    ("LoRA slots that are not JSON", "/generate",
     lambda s: ["Demo model (tiny, random: makes noise, for trying the app)", "not json", "zxq", "", 1, 1, 5.0, 0, 0,
                "Euler a", 1, False], "The LoRA slots 'not json' are not JSON."),
    ("inspect with no LoRA file", "/inspect_lora", lambda s: [""], "No LoRA file is chosen."),
    ("resize with no LoRA file", "/resize_lora", lambda s: ["", 2, None, ""], "No LoRA file is chosen."),
    ("reg pictures with 0 steps", "/make_reg_images",
     lambda s: ["Demo model (tiny, random: makes noise, for trying the app)", "a cat", 1, 0, 0, ""],
     "The steps must be at least 1."),
    ("epoch grid of a run that does not exist", "/epoch_grid", lambda s: ["nope", "1.0"],
     "There is no run 'nope' with saved settings"),
    ("use this epoch with no run", "/use_epoch", lambda s: ["", None], "No run is chosen. Pick a run in the Run list"),
    ("continue with no run", "/continue_run", lambda s: ["", 2, "epochs"], "No run is chosen."),
    ("dataset checked at a negative resolution", "/show_dataset", lambda s: ["plan-two", "zxq", -1],
     "\"Check against resolution\" = -1 px is out of range. Use 64 to 4096 px"),
    ("dataset checked at a million pixels", "/show_dataset", lambda s: ["plan-two", "zxq", 10**6],
     "\"Check against resolution\" = 1000000 px is out of range."),
    ("preset switch with settings that are not a dict", "/preset_settings", lambda s: ["character", "abc"],
     "The settings shown must be a dict of setting names and values, not 'abc'."),
    ("open in Generate with slots that are not a list", "/open_in_generate",
     lambda s: ["x.safetensors", "", "abc", 0], "The LoRA slots must be a list of objects with 'file' and 'weight'"),
    ("resize to a rank above the file's", "/resize_lora", lambda s: [str(_tiny_lora(s)), 5, None, ""],
     "tiny.safetensors has rank 2; resizing it to rank 5 would not make it smaller. Choose a rank below 2"),
]


@pytest.mark.parametrize(("endpoint", "arguments", "words"), [c[1:] for c in ODD_ENDPOINT_CASES],
                         ids=[c[0] for c in ODD_ENDPOINT_CASES])
def test_an_odd_value_sent_to_an_endpoint_gets_its_own_message(endpoint: str, arguments, words: str, tmp_path: Path,
                                                               app_server, app_client) -> None:
    """Values a script (or a stale page) can send: the answer says what to do, and nothing is written."""
    from gradio_client import handle_file

    for i in range(2):  # the dataset /save_settings names
        picture(tmp_path / f"good{i}.png", f"zxq, good picture {i}", seed=100 + i)
    app_client.predict("plan-two", [handle_file(tmp_path / f"good{i}.png") for i in range(2)], "", 64,
                       api_name="/upload_images")
    root = app_server.projects.root
    before = sorted(p for p in root.rglob("*") if "outputs" in p.parts or "reg" in p.parts)
    message = app_error(app_client.predict, *arguments(tmp_path), api_name=endpoint)
    assert words in message, message
    assert sorted(p for p in root.rglob("*") if "outputs" in p.parts or "reg" in p.parts) == before


def test_an_upload_refused_for_its_check_size_stores_nothing(tmp_path: Path, app_server, app_client) -> None:
    from gradio_client import handle_file

    picture(tmp_path / "good.png", "zxq, good picture", seed=100)
    message = app_error(app_client.predict, "refused-upload", [handle_file(tmp_path / "good.png")], "", -1,
                        api_name="/upload_images")
    assert "\"Check against resolution\" = -1 px is out of range" in message
    assert not (app_server.projects.datasets_dir / "refused-upload").exists()


def test_loading_settings_says_when_their_picture_folder_is_not_a_dataset(tmp_path: Path, app_server,
                                                                            app_client) -> None:
    """The Dataset box keeps its choice: without a word the run would train on another dataset."""
    from gradio_client import handle_file

    elsewhere = tmp_path / "my pictures"
    picture(elsewhere / "img00.png", "zxq, red")
    picture(tmp_path / "good.png", "zxq, good picture", seed=100)
    app_client.predict("loaded-set", [handle_file(tmp_path / "good.png")], "", 64, api_name="/upload_images")
    for data, noted in ((elsewhere, True), (app_server.projects.dataset_dir("loaded-set"), False)):
        path = tmp_path / "settings.toml"
        path.write_text(f"[data]\ndata = '{data}'\n", encoding="utf-8")
        *_, plan = app_client.predict(handle_file(path), api_name="/load_settings")
        assert plan.startswith("Loaded the settings of **settings.toml**.")
        assert (f"The file's picture folder `{data}` is not one of this project's datasets" in plan) is noted, plan
