"""The project folder: uploads land inside it under safe names, whatever the browser sends."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.projects import DEMO_MODEL_CHOICE, Projects, safe_name
from trainer.core.errors import DatasetError, ModelLoadError, StudioError


@pytest.mark.parametrize("raw, expected", [
    ("cat.png", "cat.png"),
    ("../../etc/passwd", "passwd"),
    ("..\\..\\Windows\\evil.png", "evil.png"),
    ("/abs/path/pic.jpg", "pic.jpg"),
    (".hidden.png", "hidden.png"),
    ("my pic (1).png", "my pic (1).png"),
    ("naïve café.png", "naïve café.png"),
    ("a<b>c:d|e?.png", "a_b_c_d_e_.png"),
    ("name with trailing dot.", "name with trailing dot"),
])
def test_safe_name_keeps_a_plain_file_name(raw: str, expected: str) -> None:
    assert safe_name(raw) == expected


@pytest.mark.parametrize("raw", ["", "   ", "..", "../", "/", "???", "..\\.."])
def test_safe_name_refuses_names_with_nothing_left(raw: str) -> None:
    with pytest.raises(StudioError, match="cannot be used"):
        safe_name(raw)


def _upload_dir(tmp_path: Path, names: dict[str, bytes]) -> list[Path]:
    """Files as gradio hands them over: a temp folder per upload, original name kept."""
    paths = []
    for i, (name, data) in enumerate(names.items()):
        folder = tmp_path / "gradio-upload" / str(i)
        folder.mkdir(parents=True)
        path = folder / name
        path.write_bytes(data)
        paths.append(path)
    return paths


def test_uploads_are_copied_into_the_dataset_with_captions_paired(tmp_path: Path, image_folder: Path) -> None:
    projects = Projects(tmp_path / "projects").ensure()
    png = (image_folder / "img00.png").read_bytes()
    other = (image_folder / "img01.png").read_bytes()
    files = _upload_dir(tmp_path, {"face one.png": png, "face one.txt": b"zxq, smiling\n",
                                   "notes.pdf": b"%PDF", "two.png": other})
    summary = projects.add_files("My Set", files)
    folder = projects.dataset_dir("My Set")
    assert sorted(p.name for p in folder.iterdir()) == ["face one.png", "face one.txt", "two.png"]
    assert (folder / "face one.txt").read_text(encoding="utf-8") == "zxq, smiling\n"
    assert summary.added == ["face one.png", "two.png"] and summary.captions == ["face one.txt"]
    assert summary.skipped[0][0] == "notes.pdf" and "not a picture" in summary.text()


def test_same_picture_twice_is_skipped_and_a_different_one_is_numbered(tmp_path: Path, image_folder: Path) -> None:
    projects = Projects(tmp_path / "projects").ensure()
    first = _upload_dir(tmp_path / "a", {"pic.png": (image_folder / "img00.png").read_bytes()})
    again = _upload_dir(tmp_path / "b", {"pic.png": (image_folder / "img00.png").read_bytes()})
    other = _upload_dir(tmp_path / "c", {"pic.png": (image_folder / "img01.png").read_bytes(),
                                         "pic.txt": b"the second one"})
    projects.add_files("set", first)
    assert projects.add_files("set", again).skipped == [("pic.png", "already in the dataset")]
    summary = projects.add_files("set", other)
    assert summary.added == ["pic-2.png"]
    assert (projects.dataset_dir("set") / "pic-2.txt").read_text(encoding="utf-8").strip() == "the second one"
    assert not (projects.dataset_dir("set") / "pic.txt").exists()


def test_an_upload_never_overwrites_a_caption_and_names_those_that_differ(tmp_path: Path, image_folder: Path) -> None:
    projects = Projects(tmp_path / "projects").ensure()
    png = {name: (image_folder / f"img0{i}.png").read_bytes() for i, name in enumerate(("a.png", "b.png", "c.png"))}
    captions = {"a.txt": b"zxq, soft light", "b.txt": b"zxq, hard light", "c.txt": b"zxq, no light"}
    projects.add_files("set", _upload_dir(tmp_path / "first", {**png, **captions}))
    folder = projects.dataset_dir("set")
    (folder / "a.txt").write_text("zxq, soft light, edited here\n", encoding="utf-8")  # edited in the grid
    (folder / "c.txt").unlink()  # emptied: a caption may come back from the upload

    summary = projects.add_files("set", _upload_dir(tmp_path / "again", {**png, **captions}))
    assert (folder / "a.txt").read_text(encoding="utf-8") == "zxq, soft light, edited here\n"
    assert (folder / "c.txt").read_text(encoding="utf-8") == "zxq, no light\n"
    assert summary.kept == ["a.txt"] and summary.captions == ["c.txt"]
    assert summary.text() == ("Added 0 pictures and 1 caption file. Skipped 3: a.png: already in the dataset; "
                              "b.png: already in the dataset; c.png: already in the dataset. Kept 1 caption of the "
                              "dataset that differs from the uploaded one: a.txt (edit them in the grid if the "
                              "uploaded text is the one you want).")


def test_a_dataset_name_with_path_parts_stays_inside_the_datasets_folder(tmp_path: Path, image_folder: Path) -> None:
    projects = Projects(tmp_path / "projects").ensure()
    projects.add_files("../../outside", [image_folder / "img00.png"])
    assert projects.list_datasets() == ["outside"]
    assert not (tmp_path / "outside").exists()


def test_import_folder_and_its_errors(tmp_path: Path, image_folder: Path) -> None:
    projects = Projects(tmp_path / "projects").ensure()
    summary = projects.import_folder("copied", str(image_folder))
    assert len(summary.added) == 8 and len(summary.captions) == 8
    with pytest.raises(DatasetError, match="is not a folder"):
        projects.import_folder("copied", str(tmp_path / "nope"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="Found 0 pictures"):
        projects.import_folder("copied", str(empty))
    with pytest.raises(DatasetError, match="No dataset is chosen"):
        projects.dataset_dir("")


def test_base_model_choices_and_resolution(tmp_path: Path) -> None:
    projects = Projects(tmp_path / "projects").ensure()
    assert projects.base_model_choices() == [DEMO_MODEL_CHOICE]
    with pytest.raises(ModelLoadError, match="No base model"):
        projects.resolve_base("")
    assert projects.resolve_base("/some/model.safetensors") == "/some/model.safetensors"


def test_lora_upload_refuses_pickles(tmp_path: Path) -> None:
    projects = Projects(tmp_path / "projects").ensure()
    bad = tmp_path / "evil.ckpt"
    bad.write_bytes(b"\x80\x04not really")
    with pytest.raises(StudioError, match="only loads .safetensors"):
        projects.store_lora_upload(bad)
    good = tmp_path / "up" / "style.safetensors"
    good.parent.mkdir()
    good.write_bytes(b"x" * 10)
    stored = projects.store_lora_upload(good)
    assert stored == projects.loras_dir / "style.safetensors"
    assert projects.store_lora_upload(good) == stored  # same content: stored once
    assert stored in projects.lora_files()


@pytest.mark.parametrize("name, reason", [
    ("._face.png", "macOS resource fork"),
    ("._face.txt", "macOS resource fork"),
    (".DS_Store", "hidden file"),
    (".secret.png", "hidden file"),
])
def test_hidden_files_and_macos_resource_forks_are_skipped_with_a_reason(tmp_path: Path, image_folder: Path,
                                                                         name: str, reason: str) -> None:
    projects = Projects(tmp_path / "projects").ensure()
    files = _upload_dir(tmp_path, {"face.png": (image_folder / "img00.png").read_bytes(),
                                   "face.txt": b"zxq, smiling", name: b"\x00\x05\x16\x07Mac OS X"})
    summary = projects.add_files("set", files)
    assert sorted(p.name for p in projects.dataset_dir("set").iterdir()) == ["face.png", "face.txt"]
    assert summary.added == ["face.png"] and summary.captions == ["face.txt"]
    assert summary.skipped == [(name, summary.skipped[0][1])] and reason in summary.skipped[0][1]
    assert f"Skipped 1: {name}: " in summary.text()


def test_import_folder_of_only_resource_forks_finds_no_pictures(tmp_path: Path, image_folder: Path) -> None:
    copied = tmp_path / "from-a-mac"
    copied.mkdir()
    (copied / "._img00.png").write_bytes(b"\x00\x05\x16\x07")
    with pytest.raises(DatasetError, match="Found 0 pictures"):
        Projects(tmp_path / "projects").ensure().import_folder("set", str(copied))
