"""The dataset as a user meets it: folders, captions, the linter's table, buckets and batches."""

from __future__ import annotations

import dataclasses
import math
import os
import random
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_pattern_image
from PIL import Image

from trainer.config.schema import DataConfig
from trainer.core.errors import DatasetError
from trainer.data.buckets import assign_bucket, fit_to_bucket, make_buckets
from trainer.data.captions import process_caption
from trainer.data.lint import LintReport, lint_dataset
from trainer.data.scan import DatasetScan, scan_dataset
from trainer.data.training_set import TrainingSet


def picture(path: Path, size: tuple[int, int] = (64, 64), seed: int = 0, caption: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    make_pattern_image(size, seed).save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return path


def data(folder: Path, **overrides: object) -> DataConfig:
    return DataConfig(data=str(folder), **overrides)  # type: ignore[arg-type]


def lint(scan: DatasetScan, cfg: DataConfig, *, resolution: int = 64, count_tokens: Callable[[str], int] | None = None,
         epochs: int = 1, batch_size: int = 1, steps: int = 0) -> LintReport:
    return lint_dataset(scan, cfg, resolution, count_tokens, epochs, batch_size, steps, bucket_step=16)


def codes(report: LintReport | DatasetScan) -> Counter[str]:
    return Counter(issue.code for issue in report.issues)


@pytest.fixture(scope="module")
def count_clip_tokens() -> Callable[[str], int]:
    from transformers import CLIPTokenizer

    from trainer.models.family import TOKENIZER_DIR

    tokenizer = CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR))
    return lambda text: len(tokenizer(text, add_special_tokens=False).input_ids)


# --- finding the pictures ------------------------------------------------------------------------


def test_plain_folder_scans_in_stable_order_with_captions(image_folder: Path) -> None:
    scan = scan_dataset(data(image_folder, trigger="zxq"))
    assert [item.path.name for item in scan.items] == [f"img{i:02d}.png" for i in range(8)]
    assert scan.items[3].caption == "zxq, picture 3, red"  # trigger already a tag: not repeated
    assert all(item.repeats == 1 and (item.width, item.height) == (64, 64) for item in scan.items)
    assert len({item.sha256 for item in scan.items}) == 8
    assert scan.issues == ()


@pytest.mark.parametrize(("setup", "message"), [
    (lambda root: None, "does not exist"),
    (lambda root: root.mkdir(), "Found 0 images in"),
    (lambda root: (root.mkdir(), (root / "a.txt").write_text("zxq")), "Found 0 images in"),
    (lambda root: (root.mkdir(), picture(root / ".hidden.png")), "Found 0 images in"),
], ids=["missing folder", "empty folder", "captions only", "hidden images only"])
def test_nothing_to_train_on_is_an_actionable_error(tmp_path: Path, setup: Callable[[Path], object],
                                                    message: str) -> None:
    root = tmp_path / "set"
    setup(root)
    with pytest.raises(DatasetError) as caught:
        scan_dataset(data(root))
    assert message in str(caught.value)
    assert "--data" in str(caught.value)  # tells the user where to point


def test_folder_of_unsupported_pictures_says_convert_them(tmp_path: Path) -> None:
    for name in ("a.heic", "b.HEIC", "c.psd"):
        (tmp_path / name).write_bytes(b"\0" * 16)
    with pytest.raises(DatasetError, match=r"2 HEIC, 1 PSD.*Convert them to PNG or JPEG"):
        scan_dataset(data(tmp_path))


def test_empty_data_setting_is_an_error() -> None:
    with pytest.raises(DatasetError, match="No dataset folder"):
        scan_dataset(DataConfig())


def test_kohya_repeat_folders_hidden_files_and_symlink_loops(tmp_path: Path) -> None:
    root = tmp_path / "set"
    picture(root / "top.png", caption="top")
    picture(root / "10_zxq girl" / "a.png", seed=1, caption="a")
    picture(root / "10_zxq girl" / "closeups" / "b.png", seed=2, caption="b")
    picture(root / "2_style" / "c.png", seed=3, caption="c")
    picture(root / ".thumbs" / "d.png", seed=4)
    picture(root / "._top.png", seed=5)
    if hasattr(os, "symlink"):
        os.symlink(root, root / "10_zxq girl" / "loop", target_is_directory=True)

    scan = scan_dataset(data(root, repeats=3))
    repeats = {item.path.name: item.repeats for item in scan.items}
    assert repeats == {"top.png": 3, "a.png": 10, "b.png": 10, "c.png": 2}
    assert scan.num_samples == 25
    assert scan.folder_summary()["10_zxq girl"] == {"n_repeats": 10, "img_count": 1}
    assert scan.tag_frequency()["2_style"] == {"c": 1}


def test_unreadable_files_are_reported_and_skipped(tmp_path: Path) -> None:
    root = tmp_path / "set"
    picture(root / "good.png", caption="good")
    (root / "empty.png").write_bytes(b"")
    (root / "notes.png").write_text("not a picture")
    picture(root / "cut.jpg", size=(96, 96))
    (root / "cut.jpg").write_bytes((root / "cut.jpg").read_bytes()[:300])
    (root / "phone.heic").write_bytes(b"\0" * 10)

    scan = scan_dataset(data(root))
    assert [item.path.name for item in scan.items] == ["good.png"]
    unreadable = {issue.path.name for issue in scan.issues if issue.code == "unreadable"}
    assert unreadable == {"empty.png", "notes.png", "cut.jpg"}
    assert codes(scan)["unsupported_format"] == 1
    assert all(issue.severity == "error" and issue.fix for issue in scan.issues if issue.code == "unreadable")
    assert scan.num_files == 4


def test_size_is_reported_after_exif_rotation(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "set" / "phone.jpg"
    path.parent.mkdir()
    make_pattern_image((80, 40), 0).save(path, exif=exif.tobytes())
    (item,) = scan_dataset(data(path.parent)).items
    assert (item.width, item.height) == (40, 80)


# --- captions ------------------------------------------------------------------------------------


# (name, sidecar file name, sidecar bytes, trigger, expected caption, expected issue code)
CAPTION_CASES: list[tuple[str, str | None, bytes, str, str, str | None]] = [
    ("utf-8", "x.txt", "café, girl".encode(), "", "café, girl", None),
    ("utf-8 with BOM", "x.txt", b"\xef\xbb\xbf" + "café, girl".encode(), "", "café, girl", None),
    ("cp1252 falls back with a warning", "x.txt", "café, girl".encode("cp1252"), "", "café, girl", "caption_encoding"),
    ("utf-16 from Notepad", "x.txt", "café, girl".encode("utf-16"), "", "café, girl", None),
    ("latin-1 when not even cp1252", "x.txt", b"caf\xe9, \x81girl", "", "café, \x81girl", "caption_encoding"),
    ("newlines become commas", "x.txt", b"  a girl,\r\nred hair\n\n smiling \n", "", "a girl, red hair, smiling", None),
    (".caption sidecar", "x.caption", b"a girl", "", "a girl", None),
    ("trigger prepended", "x.txt", b"a girl", "zxq", "zxq, a girl", None),
    ("trigger already a tag (any case)", "x.txt", b"a girl, ZXQ", "zxq", "a girl, ZXQ", None),
    ("trigger inside a tag is not the tag", "x.txt", b"zxq girl", "zxq", "zxq, zxq girl", None),
    ("empty caption file", "x.txt", b"  \n", "", "", "empty_caption"),
    ("empty caption file with trigger", "x.txt", b"", "zxq", "zxq", "empty_caption"),
    ("no caption file: trigger alone", None, b"", "zxq", "zxq", "missing_caption"),
]


@pytest.mark.parametrize(("name", "sidecar", "raw", "trigger", "expected", "issue"), CAPTION_CASES,
                         ids=[c[0] for c in CAPTION_CASES])
def test_caption_sidecars(tmp_path: Path, name: str, sidecar: str | None, raw: bytes, trigger: str,
                          expected: str, issue: str | None) -> None:
    picture(tmp_path / "x.png")
    if sidecar:
        (tmp_path / sidecar).write_bytes(raw)
    scan = scan_dataset(data(tmp_path, trigger=trigger))
    assert scan.items[0].caption == expected
    assert list(codes(scan)) == ([issue] if issue else [])


def test_missing_caption_uses_default_then_folder_name(tmp_path: Path) -> None:
    picture(tmp_path / "a.png")
    picture(tmp_path / "5_blue car" / "b.png", seed=1)
    captions = {i.path.name: i.caption for i in scan_dataset(data(tmp_path, trigger="zxq")).items}
    assert captions == {"a.png": "zxq", "b.png": "zxq, blue car"}  # kohya: folder name as caption
    scan = scan_dataset(data(tmp_path, trigger="zxq", default_caption="a photo"))
    assert {i.caption for i in scan.items} == {"zxq, a photo"}
    assert codes(scan)["missing_caption"] == 2
    assert "a photo" in scan.issues[0].message  # says what it will train with


# --- the linter ----------------------------------------------------------------------------------


def test_lint_finds_small_duplicate_and_long_captions(tmp_path: Path,
                                                      count_clip_tokens: Callable[[str], int]) -> None:
    picture(tmp_path / "ok.png", size=(128, 96), caption="a red car")
    picture(tmp_path / "ok_copy.png", size=(128, 96), caption="a red car")  # same bytes as ok.png
    picture(tmp_path / "soft.png", size=(64, 48), seed=1, caption="a blue car")
    picture(tmp_path / "dot.png", size=(1, 1), seed=2, caption="a dot")
    long_caption = ", ".join(f"detail {i}" for i in range(40))  # 40 x "detail, N, ','" > 75 tokens
    picture(tmp_path / "wordy.png", size=(96, 96), seed=3, caption=long_caption)
    assert count_clip_tokens(long_caption) > 75 >= count_clip_tokens("a red car")

    scan = scan_dataset(data(tmp_path, trigger="zxq"))
    report = lint(scan, data(tmp_path, trigger="zxq"), resolution=96, count_tokens=count_clip_tokens)
    by_code = {(issue.code, issue.path.name if issue.path else None): issue for issue in report.issues}
    assert by_code[("too_small", "dot.png")].severity == "error"  # 1x1: upscaled 96x
    assert by_code[("too_small", "soft.png")].severity == "warning"  # 48 px short side: soft, usable
    assert ("too_small", "ok.png") not in by_code
    assert "ok.png" in by_code[("duplicate", "ok_copy.png")].message
    assert ("caption_too_long", "wordy.png") in by_code
    assert codes(report)["caption_too_long"] == 1
    assert not report.ok
    assert [i.severity for i in report.issues] == sorted((i.severity for i in report.issues),
                                                         key=["error", "warning", "info"].index)
    assert report.trigger_count == 5


def test_token_check_is_skipped_without_a_counter(tmp_path: Path) -> None:
    picture(tmp_path / "x.png", caption=", ".join(["word"] * 200))
    assert codes(lint(scan_dataset(data(tmp_path)), data(tmp_path)))["caption_too_long"] == 0


def test_trigger_coverage_and_advice(tmp_path: Path) -> None:
    picture(tmp_path / "a.png", caption="zxq, a girl")
    picture(tmp_path / "b.png", seed=1, caption="a girl")
    scan = scan_dataset(data(tmp_path))
    report = lint(scan, data(tmp_path))
    assert codes(report)["no_trigger"] == 1 and report.issues[-1].severity == "info"  # none set: advise one

    cfg = data(tmp_path, trigger="zxq")
    report = lint(scan, cfg)  # captions as typed, checked against a trigger set afterwards
    assert report.trigger_count == 1
    assert [i.path.name for i in report.issues if i.code == "no_trigger"] == ["b.png"]
    assert report.ok  # warnings only

    report = lint(scan_dataset(cfg), data(tmp_path, trigger="zxq", shuffle_captions=True, keep_tokens=0))
    assert codes(report)["trigger_shuffled"] == 1 and report.trigger_count == 2


def test_empty_captions_are_flagged_once(tmp_path: Path) -> None:
    picture(tmp_path / "a.png", caption="")
    picture(tmp_path / "b.png", seed=1)
    report = lint(scan_dataset(data(tmp_path)), data(tmp_path))
    assert codes(report)["empty_caption"] == 1 and codes(report)["missing_caption"] == 1


# (name, square images, wide 2:1 images, folder repeats, epochs, batch, fixed steps,
#  expected steps/epoch, total steps, epochs)
STEPS_CASES = [
    ("one per step", 8, 0, 1, 10, 1, 0, 8, 80, 10.0),
    ("repeats x epochs / batch", 8, 0, 10, 3, 4, 0, 20, 60, 3.0),
    ("last batch short", 10, 0, 1, 7, 3, 0, 4, 28, 7.0),
    ("each bucket rounds up", 5, 3, 1, 10, 2, 0, 5, 50, 10.0),
    ("fixed steps imply epochs", 8, 0, 10, 10, 4, 120, 20, 120, 6.0),
    ("fixed steps, partial epoch", 8, 0, 10, 10, 4, 50, 20, 50, 2.5),
]


@pytest.mark.parametrize(("name", "squares", "wides", "repeats", "epochs", "batch", "steps", "per_epoch",
                          "total", "implied_epochs"), STEPS_CASES, ids=[c[0] for c in STEPS_CASES])
def test_steps_math(tmp_path: Path, name: str, squares: int, wides: int, repeats: int, epochs: int, batch: int,
                    steps: int, per_epoch: int, total: int, implied_epochs: float) -> None:
    folder = tmp_path / f"{repeats}_zxq"
    for i in range(squares):
        picture(folder / f"s{i}.png", size=(64, 64), seed=i, caption="zxq")
    for i in range(wides):
        picture(folder / f"w{i}.png", size=(128, 64), seed=100 + i, caption="zxq")
    cfg = data(tmp_path, trigger="zxq")
    report = lint(scan_dataset(cfg), cfg, resolution=64, epochs=epochs, batch_size=batch, steps=steps)
    plan = report.steps
    assert plan is not None
    assert (plan.images, plan.samples_per_epoch) == (squares + wides, (squares + wides) * repeats)
    assert (plan.steps_per_epoch, plan.total_steps, plan.epochs) == (per_epoch, total, implied_epochs)
    assert f"{total} steps" in report.summary_text()


def test_summary_text_reads_like_a_report(image_folder: Path) -> None:
    shutil.copy(image_folder / "img00.png", image_folder / "img99.png")
    cfg = data(image_folder, trigger="zxq")
    text = lint(scan_dataset(cfg), cfg, epochs=2, batch_size=2).summary_text()
    assert "9 usable images of 9" in text
    assert "÷ batch 2" in text and "= 10 steps" in text
    assert "64×64: 9" in text
    assert 'Trigger "zxq": in 9 of 9' in text
    assert "img99.png is an exact copy of img00.png" in text


def test_summary_groups_repeated_problems(tmp_path: Path) -> None:
    for i in range(6):
        picture(tmp_path / f"p{i}.png", seed=i)
    text = lint(scan_dataset(data(tmp_path)), data(tmp_path)).summary_text()
    assert "0 errors, 6 warnings" in text
    assert "p0.png has no caption file" in text and "(+5 more like this: p1.png, p2.png, p3.png, …)" in text
    assert "p4.png has no caption" not in text


def test_nothing_usable_is_an_error_row_not_a_crash(tmp_path: Path) -> None:
    (tmp_path / "bad.png").write_text("nope")
    scan = scan_dataset(data(tmp_path))
    report = lint(scan, data(tmp_path))
    assert not report.ok and codes(report)["no_images"] == 1 and report.steps is None
    with pytest.raises(DatasetError, match="can be used"):
        TrainingSet(scan, data(tmp_path), 64)


# --- buckets -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("resolution", "step", "min_side", "max_side"), [
    (512, 64, 256, 1024), (768, 64, 256, 1024), (1024, 64, 256, 2048), (512, 64, 384, 768), (64, 16, 256, 1024),
])
def test_buckets_are_latent_aligned_and_within_budget(resolution: int, step: int, min_side: int,
                                                      max_side: int) -> None:
    buckets = make_buckets(resolution, step, min_side, max_side)
    assert (resolution, resolution) in buckets
    assert any(w > h for w, h in buckets) and any(h > w for w, h in buckets)
    for w, h in buckets:
        assert w % step == 0 and h % step == 0
        assert w * h <= resolution * resolution
        if min_side <= resolution <= max_side:
            assert min_side <= min(w, h) and max(w, h) <= max_side
    aspects = [w / h for w, h in buckets]
    assert len(set(aspects)) == len(aspects)  # one bucket per aspect ratio


# (image w, h) -> the bucket must be exact size, have the image's orientation, crop little
@pytest.mark.parametrize("size", [(1024, 512), (512, 1024), (300, 300), (1000, 700), (700, 1000), (50, 40),
                                  (1500, 500)])
def test_fit_to_bucket_is_exact_and_crops_little(size: tuple[int, int]) -> None:
    buckets = make_buckets(512, 64, 256, 1024)
    bucket = assign_bucket(*size, buckets)
    w, h = size
    assert (bucket[0] > bucket[1]) == (w > h) and (bucket[0] == bucket[1]) == (w == h)
    fitted, (top, left), original = fit_to_bucket(make_pattern_image(size, 0), bucket)
    assert fitted.size == bucket
    assert original == (h, w)
    scale = max(bucket[0] / w, bucket[1] / h)
    cropped = 1 - min(bucket[0] / (w * scale), bucket[1] / (h * scale))
    assert cropped < 0.10  # the nearest aspect ratio leaves only a sliver to crop
    assert (top, left) == ((round(h * scale) - bucket[1]) // 2, (round(w * scale) - bucket[0]) // 2)


def test_two_to_one_goes_to_a_wide_bucket() -> None:
    buckets = make_buckets(512, 64, 256, 1024)
    wide = assign_bucket(1024, 512, buckets)
    assert wide[0] / wide[1] == pytest.approx(2, rel=0.15)
    assert assign_bucket(512, 1024, buckets) == wide[::-1]


# --- captions per step ---------------------------------------------------------------------------


def test_process_caption_keeps_tags_and_the_first_ones_in_place() -> None:
    caption = "zxq, red hair, smiling, outdoors, blue dress, hat"
    plain = process_caption(caption, shuffle=False, keep_tokens=1, dropout=0.0, rng=random.Random(0))
    assert plain == caption
    orders = set()
    for seed in range(20):
        out = process_caption(caption, shuffle=True, keep_tokens=1, dropout=0.0, rng=random.Random(seed))
        tags = out.split(", ")
        assert tags[0] == "zxq" and sorted(tags) == sorted(caption.split(", "))
        orders.add(out)
    assert len(orders) > 5
    kept = process_caption(caption, shuffle=True, keep_tokens=10, dropout=0.0, rng=random.Random(1))
    assert kept == caption


def test_caption_dropout_rate() -> None:
    rng = random.Random(0)
    dropped = sum(process_caption("a, b", shuffle=False, keep_tokens=0, dropout=0.3, rng=rng) == ""
                  for _ in range(2000))
    assert 0.25 < dropped / 2000 < 0.35


# --- the training set ----------------------------------------------------------------------------


@pytest.fixture
def mixed_set(tmp_path: Path) -> Callable[..., TrainingSet]:
    """5 squares (3 repeats), 4 wide and 2 tall pictures (1 repeat), captions 'zxq, tag i, ...'."""
    for i in range(5):
        picture(tmp_path / "3_zxq" / f"s{i}.png", (64, 64), i, f"zxq, square {i}, red, outdoors")
    for i in range(4):
        picture(tmp_path / f"w{i}.png", (128, 64), 10 + i, f"zxq, wide {i}, blue, indoors")
    for i in range(2):
        picture(tmp_path / f"t{i}.png", (64, 128), 20 + i, f"zxq, tall {i}, green")

    def build(**overrides: object) -> TrainingSet:
        cfg = data(tmp_path, trigger="zxq", **overrides)
        return TrainingSet(scan_dataset(cfg), cfg, resolution=64, bucket_step=16)
    return build


def test_epoch_batches_are_deterministic_single_bucket_and_complete(mixed_set: Callable[..., TrainingSet]) -> None:
    ts = mixed_set()
    assert ts.num_samples == 5 * 3 + 4 + 2
    assert len(ts.bucket_counts()) == 3
    batches = ts.epoch_batches(epoch=0, batch_size=4, seed=42)
    assert batches == ts.epoch_batches(epoch=0, batch_size=4, seed=42)
    assert batches != ts.epoch_batches(epoch=1, batch_size=4, seed=42)
    assert batches != ts.epoch_batches(epoch=0, batch_size=4, seed=43)
    assert len(batches) == ts.steps_per_epoch(4) == math.ceil(15 / 4) + 1 + 1
    for batch in batches:
        assert 1 <= len(batch) <= 4
        assert len({ref.bucket for ref in batch}) == 1
        assert all(ts.item_buckets[ref.index] == ref.bucket for ref in batch)
    seen = Counter(ref.index for batch in batches for ref in batch)
    assert seen == {i: item.repeats for i, item in enumerate(ts.items)}
    assert sorted(ref.slot for batch in batches for ref in batch) == list(range(ts.num_samples))


def test_flips_are_deterministic_and_do_not_change_the_order(mixed_set: Callable[..., TrainingSet]) -> None:
    plain, flipping = mixed_set(), mixed_set(flip=True)
    assert not any(ref.flip for batch in plain.epoch_batches(0, 2, 7) for ref in batch)
    flips = [ref.flip for batch in flipping.epoch_batches(0, 2, 7) for ref in batch]
    assert 0 < sum(flips) < len(flips)
    assert flips == [ref.flip for batch in flipping.epoch_batches(0, 2, 7) for ref in batch]
    strip = [[(r.index, r.slot) for r in b] for b in plain.epoch_batches(0, 2, 7)]
    assert strip == [[(r.index, r.slot) for r in b] for b in flipping.epoch_batches(0, 2, 7)]


def test_captions_per_step(mixed_set: Callable[..., TrainingSet]) -> None:
    static = mixed_set()
    ref = static.epoch_batches(0, 1, 0)[0][0]
    assert static.is_caption_static and static.caption_for(ref, 0, 0) == static.items[ref.index].caption

    shuffled = mixed_set(shuffle_captions=True, keep_tokens=1)
    assert not shuffled.is_caption_static and not mixed_set(caption_dropout=0.1).is_caption_static
    refs = [r for epoch in range(4) for b in shuffled.epoch_batches(epoch, 1, 0) for r in b]
    captions = [shuffled.caption_for(r, e, 0) for e in range(4) for b in shuffled.epoch_batches(e, 1, 0) for r in b]
    assert captions == [shuffled.caption_for(r, e, 0) for e in range(4) for b in shuffled.epoch_batches(e, 1, 0)
                        for r in b]  # resumable: the same caption for the same (sample, epoch, seed)
    assert all(c.startswith("zxq, ") for c in captions)
    assert len(set(captions)) > len({r.index for r in refs})  # the same picture saw different orders


def test_load_pixels_gives_bucket_sized_tensor_in_range(mixed_set: Callable[..., TrainingSet]) -> None:
    ts = mixed_set(flip=True)
    refs = [ref for batch in ts.epoch_batches(0, 1, 3) for ref in batch]
    for ref in refs[:6]:
        pixels, crop, original = ts.load_pixels(ref)
        assert pixels.dtype == torch.float32 and pixels.shape == (3, ref.bucket[1], ref.bucket[0])
        assert -1.0 <= pixels.min() and pixels.max() <= 1.0
        item = ts.items[ref.index]
        assert original == (item.height, item.width)
        assert crop == (0, 0) if item.width == item.height else crop[0] == 0 < crop[1] < 0.2 * item.width
    flipped = next(r for r in refs if r.flip)
    unflipped = dataclasses.replace(flipped, flip=False)
    assert torch.equal(ts.load_pixels(flipped)[0], ts.load_pixels(unflipped)[0].flip(-1))
    expected = np.asarray(Image.open(ts.items[unflipped.index].path).convert("RGB"), np.float32) / 127.5 - 1
    assert np.allclose(ts.load_pixels(unflipped)[0].permute(1, 2, 0).numpy(), expected, atol=1e-6)


def test_bucketing_off_gives_one_square_bucket(mixed_set: Callable[..., TrainingSet]) -> None:
    ts = mixed_set(buckets=False)
    assert ts.buckets == [(64, 64)] and set(ts.item_buckets) == {(64, 64)}
    assert ts.steps_per_epoch(4) == math.ceil(21 / 4)
    pixels, crop, original = ts.load_pixels(next(r for b in ts.epoch_batches(0, 1, 0) for r in b
                                                 if ts.items[r.index].width == 128))
    assert pixels.shape == (3, 64, 64) and crop == (0, 32) and original == (64, 128)


@pytest.mark.parametrize(("resolution", "size", "bucket"), [
    (1024, (1600, 900), (1344, 768)),  # SDXL 16:9 trains at kohya's size, not capped at 1024 wide
    (512, (1600, 900), (640, 384)),
    (512, (900, 1600), (384, 640)),
])
def test_default_largest_bucket_side_scales_with_the_resolution(tmp_path: Path, resolution, size, bucket):
    Image.new("RGB", size, (90, 120, 30)).save(tmp_path / "wide.png")
    (tmp_path / "wide.txt").write_text("zxq", encoding="utf-8")
    cfg = DataConfig(data=str(tmp_path))
    training_set = TrainingSet(scan_dataset(cfg), cfg, resolution, bucket_step=64)
    assert training_set.item_buckets == (bucket,)
