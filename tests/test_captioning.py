"""Auto-captioning on tiny models built in code: tags follow thresholds and blacklist, modes never lose a caption."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image
from tiny_captioners import expected_probabilities, write_tiny_blip, write_tiny_tagger

from trainer.core.errors import ModelLoadError
from trainer.data.caption_undo import CaptionUndo
from trainer.data.captioning.autocaption import (
    CaptionProgress,
    caption_folder,
    undo_last_captioning,
)
from trainer.data.captioning.tagger import (
    TaggerSettings,
    open_tagger,
    prepare_image,
    select_tags,
)

BLUE, RED = (0, 0, 255), (255, 0, 0)


@pytest.fixture(scope="module")
def tagger_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_tagger(tmp_path_factory.mktemp("models") / "tiny-tagger")


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_blip(tmp_path_factory.mktemp("models") / "tiny-blip")


def pictures(folder: Path, colours: dict[str, tuple[int, int, int]], captions: dict[str, str] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, colour in colours.items():
        Image.new("RGB", (48, 48), colour).save(folder / f"{name}.png")
    for name, text in (captions or {}).items():
        (folder / name).write_bytes(text.encode("cp1252") if name.endswith(".caption") else text.encode("utf-8"))
    return folder


# --- the tagger ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("settings", "tags"), [
    (TaggerSettings(), ["hatsune miku", "blue hair", "1girl", "^_^", "smile"]),
    (TaggerSettings(general_threshold=0.45), ["hatsune miku", "blue hair", "1girl", "^_^"]),
    (TaggerSettings(general_threshold=0.2, character_threshold=0.4),
     ["hatsune miku", "kagamine rin", "blue hair", "1girl", "^_^", "smile", "simple background"]),
    (TaggerSettings(character_threshold=1.0), ["blue hair", "1girl", "^_^", "smile"]),
    (TaggerSettings(blacklist=("smile", "blue_hair", "HATSUNE MIKU")), ["1girl", "^_^"]),
    (TaggerSettings(max_tags=2), ["hatsune miku", "blue hair"]),
    (TaggerSettings(rating_tags=True, max_tags=1), ["sensitive", "blue hair"]),
    (TaggerSettings(replace_underscores=False), ["hatsune_miku", "blue_hair", "1girl", "^_^", "smile"]),
    (TaggerSettings(character_first=False), ["blue hair", "hatsune miku", "1girl", "^_^", "smile"]),
], ids=["defaults", "higher general", "lower both", "characters off", "blacklist", "max tags", "rating",
        "underscores", "by confidence"])
def test_tags_follow_thresholds_blacklist_and_options(tagger_dir: Path, settings: TaggerSettings, tags) -> None:
    tagger = open_tagger(str(tagger_dir), settings)
    probs = tagger.probabilities([Image.new("RGB", (48, 48), BLUE)])[0]
    expected = expected_probabilities((1.0, 0.0, 0.0))
    assert probs.tolist() == pytest.approx([expected[label.name] for label in tagger.labels], abs=1e-5)
    assert select_tags(probs, tagger.labels, settings) == tags


def test_pictures_are_white_padded_bgr_at_the_models_size(tagger_dir: Path) -> None:
    tagger = open_tagger(str(tagger_dir))
    assert tagger.size == 32 and tagger.input_name == "input_1:0"
    tall = Image.new("RGB", (10, 40), BLUE)  # padded with white: red rises to 0.75 of the square
    array = prepare_image(tall, 32)
    assert array.shape == (32, 32, 3) and array.dtype.name == "float32"
    assert tuple(array[16, 16]) == (255.0, 0.0, 0.0) and tuple(array[16, 0]) == (255.0, 255.0, 255.0)  # BGR
    transparent = Image.new("RGBA", (32, 32), (0, 0, 255, 0))  # fully transparent: white
    assert prepare_image(transparent, 32).min() == 255.0
    captions = tagger.caption_batch([Image.new("RGB", (40, 40), RED), tall])
    assert captions == ["hatsune miku, red background, 1girl, ^_^, smile",
                        "hatsune miku, blue hair, red background, 1girl, ^_^, smile"]


def test_a_missing_or_broken_tagger_says_what_to_download(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"Tagger not found.*hf download SmilingWolf/wd-vit-tagger-v3 "
                                             r"model.onnx selected_tags.csv"):
        open_tagger(str(tmp_path / "nothing-here"))
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "model.onnx").write_bytes(b"not a model")
    with pytest.raises(ModelLoadError, match="selected_tags.csv is missing"):
        open_tagger(str(tmp_path / "half"))
    (tmp_path / "half" / "selected_tags.csv").write_text("tag_id,name,category,count\n0,a,0,1\n", encoding="utf-8")
    with pytest.raises(ModelLoadError, match="not a model onnxruntime can load"):
        open_tagger(str(tmp_path / "half"))
    with pytest.raises(ModelLoadError, match="Cannot get the tagger nobody/none from the hub"):
        open_tagger("nobody/none")  # offline in the tests: the hub cannot be reached


def test_tags_csv_of_another_model_is_refused(tagger_dir: Path, tmp_path: Path) -> None:
    other = tmp_path / "mismatch"
    other.mkdir()
    (other / "model.onnx").write_bytes((tagger_dir / "model.onnx").read_bytes())
    (other / "selected_tags.csv").write_text("tag_id,name,category,count\n0,a,0,1\n", encoding="utf-8")
    with pytest.raises(ModelLoadError, match="outputs 12 values but its selected_tags.csv lists 1 tags"):
        open_tagger(str(other)).caption_batch([Image.new("RGB", (8, 8))])


# --- modes and undo ------------------------------------------------------------------------------


def test_modes_never_lose_a_caption_and_undo_restores_the_bytes(tagger_dir: Path, tmp_path: Path) -> None:
    original_txt = "zxq, my own words, smile\n"
    original_caption = "café au lait, blue hair"  # cp1252 bytes, as Windows tools write them
    folder = pictures(tmp_path / "set", {"a": BLUE, "b": BLUE, "c": RED, "d": BLUE},
                      {"a.txt": original_txt, "b.caption": original_caption, "d.txt": "  \n"})
    (folder / "2_more").mkdir()
    Image.new("RGB", (48, 48), RED).save(folder / "2_more" / "e.png")
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.suffix in (".txt", ".caption")}
    tagger = open_tagger(str(tagger_dir), TaggerSettings(max_tags=2))
    progress: list[CaptionProgress] = []

    skipped = caption_folder(folder, tagger, trigger="zxq", batch_size=2, on_progress=progress.append)
    assert sorted(p.name for p in skipped.written) == ["c.png", "d.png", "e.png"]  # d's caption was blank
    assert sorted(p.name for p in skipped.skipped) == ["a.png", "b.png"]
    assert (folder / "a.txt").read_bytes() == before[folder / "a.txt"]
    assert (folder / "c.txt").read_text(encoding="utf-8") == "zxq, hatsune miku, red background\n"
    assert (folder / "2_more" / "e.txt").is_file()
    assert [(p.done, p.total) for p in progress] == [(4, 5), (5, 5)] and progress[-1].eta_s == 0

    appended = caption_folder(folder, tagger, mode="append", trigger="zxq")
    assert (folder / "a.txt").read_text(encoding="utf-8") == "zxq, my own words, smile, hatsune miku, blue hair\n"
    assert (folder / "b.caption").read_text(encoding="utf-8") == "zxq, café au lait, blue hair, hatsune miku\n"
    assert not (folder / "b.txt").exists()  # the caption stays in the sidecar it was in
    assert {p.name for p in appended.unchanged} == {"c.png", "d.png", "e.png"}  # nothing new: not rewritten

    caption_folder(folder, tagger, mode="overwrite")
    assert (folder / "a.txt").read_text(encoding="utf-8") == "hatsune miku, blue hair\n"

    undo = CaptionUndo(folder)
    assert [b.label for b in undo.batches()] == [f"Auto-caption with tiny-tagger ({m})"
                                                 for m in ("overwrite", "append", "skip")]
    for _ in range(3):
        undo_last_captioning(folder)
    after = {p: p.read_bytes() for p in folder.rglob("*") if p.suffix in (".txt", ".caption")
             and ".lora-studio" not in p.parts}
    assert after == before  # exact bytes, cp1252 and the blank file included; new sidecars removed
    assert CaptionUndo(folder).latest() is None
    redo = CaptionUndo(folder).batches()[0]
    assert redo.label == "Before undoing: Auto-caption with tiny-tagger (skip)"
    CaptionUndo(folder).restore(redo.id)  # an undo can itself be undone
    assert (folder / "c.txt").read_text(encoding="utf-8") == "zxq, hatsune miku, red background\n"
    assert CaptionUndo(folder).latest().label == "Auto-caption with tiny-tagger (skip)"  # undoable again


def test_undo_refuses_records_that_point_outside_the_dataset(tmp_path: Path) -> None:
    folder = pictures(tmp_path / "set", {"a": BLUE}, {"a.txt": "a"})
    undo = CaptionUndo(folder)
    with undo.batch("edit") as writer:
        writer.write(folder / "a.txt", "b")
    entry = next((undo.folder / undo.latest().id / "entries").glob("*.json"))
    entry.write_text('{"path": "../outside.txt", "old": null}', encoding="utf-8")
    with pytest.raises(Exception, match="outside the dataset folder"):
        undo.restore()
    assert not (tmp_path / "outside.txt").exists()


def test_unreadable_pictures_are_reported_not_fatal(tagger_dir: Path, tmp_path: Path) -> None:
    folder = pictures(tmp_path / "set", {"a": BLUE})
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    report = caption_folder(folder, open_tagger(str(tagger_dir)))
    assert [p.name for p in report.written] == ["a.png"] and [p.name for p, _ in report.failed] == ["broken.png"]
    assert "1 could not be read (broken.png)" in report.text()


# --- the captioner -------------------------------------------------------------------------------


def test_captioner_writes_sentences_and_strips_its_prompt(blip_dir: Path, tmp_path: Path) -> None:
    from trainer.data.captioning.captioner import TransformersCaptioner

    captioner = TransformersCaptioner(str(blip_dir), max_new_tokens=6)
    images = [Image.new("RGB", (48, 48), BLUE), Image.new("RGB", (30, 50), RED)]
    plain = captioner.caption_batch(images)
    assert plain == captioner.caption_batch(images) and all(plain)  # greedy: the same every time
    assert plain[:1] == captioner.caption_batch(images[:1])  # batching changes nothing
    prompted = TransformersCaptioner(str(blip_dir), prompt="a picture of", max_new_tokens=6)
    assert all(not c.startswith("a picture of") for c in prompted.caption_batch(images))

    folder = pictures(tmp_path / "set", {"a": BLUE, "b": RED}, {"b.txt": "zxq, hand written"})
    report = caption_folder(folder, captioner, trigger="zxq")
    assert [p.name for p in report.written] == ["a.png"]
    assert (folder / "a.txt").read_text(encoding="utf-8") == f"zxq, {plain[0]}\n"
    assert (folder / "b.txt").read_text(encoding="utf-8") == "zxq, hand written"
    with pytest.raises(ModelLoadError, match="Captioning model not found.*hf download Salesforce"):
        TransformersCaptioner(str(tmp_path / "missing"))


# --- the command line ----------------------------------------------------------------------------


def _cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    from trainer.cli.main import main

    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_caption_and_tags_commands(tagger_dir: Path, tmp_path: Path, capsys) -> None:
    folder = pictures(tmp_path / "set", {"a": BLUE, "b": RED}, {"b.txt": "zxq, mine"})
    code, out, err = _cli(capsys, "caption", str(folder), "--tagger", str(tagger_dir), "--trigger", "zxq",
                          "--blacklist", "smile, ^_^")
    assert code == 0, err
    assert "Captioned 1 picture; left 1 that already had a caption." in out
    assert (folder / "a.txt").read_text(encoding="utf-8") == "zxq, hatsune miku, blue hair, 1girl\n"
    code, out, _ = _cli(capsys, "tags", str(folder), "--trigger", "zxq")
    assert code == 0 and "zxq" in out and "the trigger word" in out
    code, out, _ = _cli(capsys, "caption", str(folder), "--undo")
    assert code == 0 and "1 caption restored" in out and not (folder / "a.txt").exists()
    code, _, err = _cli(capsys, "caption", str(folder))
    assert code == 2 and "Name a model" in err and "Traceback" not in err
