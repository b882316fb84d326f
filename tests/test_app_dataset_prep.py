"""The Dataset tab's preparation panel through its endpoints: captions, overwrite asks first, undo, tags, masks, reg pictures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gradio_client import Client
from PIL import Image
from tiny_captioners import write_tiny_tagger

from app.dataset_prep import TAGGER
from app.projects import DEMO_MODEL_CHOICE

APP_PORT = 7930  # app_server's first port for this module
DATASET = "prep-set"
TAGGER_DEFAULTS = ("zxq", 0.35, 0.85, "", 0, False, False, "", 8)  # trigger, thresholds, blacklist, max, ...


def caption(client: Client, model: Path, mode: str, confirmed: bool = False, **changes):
    values = dict(zip(("trigger", "general", "character", "blacklist", "max_tags", "ratings", "underscores",
                       "prompt", "batch"), TAGGER_DEFAULTS))
    values.update(changes)
    return client.predict(DATASET, confirmed, TAGGER, str(model), mode, *values.values(), api_name="/caption_dataset")


@pytest.fixture(scope="module")
def prepared(app_server) -> tuple[Path, Path]:
    """Three blue pictures (one captioned by hand, one with a mask) and the tiny tagger in models/taggers/."""
    folder = app_server.projects.datasets_dir / DATASET
    folder.mkdir(parents=True)
    for name in ("a", "b", "c"):
        Image.new("RGB", (64, 64), (0, 0, 255)).save(folder / f"{name}.png")
    (folder / "a.txt").write_text("zxq, hand written\n", encoding="utf-8")
    mask = np.zeros((64, 64), np.uint8)
    mask[:, :32] = 255
    Image.fromarray(mask, "L").save(folder / "c.mask.png")
    model = write_tiny_tagger(app_server.projects.models_dir / "taggers" / "tiny-tagger")
    return folder, model


def test_the_panel_endpoints_are_named(app_client: Client) -> None:
    named = set(app_client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert {"/caption_dataset", "/undo_captions", "/tag_frequency", "/make_reg_images"} <= named


def test_caption_overwrite_asks_first_and_undo_brings_captions_back(app_client: Client, prepared) -> None:
    folder, model = prepared
    _, status = caption(app_client, model, "skip")  # (confirmation text, status); the row is layout
    assert status == "Captioned 2 pictures; left 1 that already had a caption. Undo takes the changes back."
    assert (folder / "b.txt").read_text(encoding="utf-8") == "zxq, hatsune miku, blue hair, 1girl, ^_^, smile\n"
    assert (folder / "a.txt").read_text(encoding="utf-8") == "zxq, hand written\n"
    assert not (folder / "c.mask.txt").exists()  # a mask is not a picture

    question, status = caption(app_client, model, "overwrite", max_tags=1)
    assert "Overwrite 3 existing captions?" in question and status == ""
    assert (folder / "a.txt").read_text(encoding="utf-8") == "zxq, hand written\n"  # nothing happened yet
    _, status = caption(app_client, model, "overwrite", confirmed=True, max_tags=1)
    assert status.startswith("Captioned 3 pictures")
    assert (folder / "a.txt").read_text(encoding="utf-8") == "zxq, blue hair\n"

    status = app_client.predict(DATASET, api_name="/undo_captions")
    assert status == "Undid 'Auto-caption with tiny-tagger (overwrite)': 3 captions restored."
    assert (folder / "a.txt").read_text(encoding="utf-8") == "zxq, hand written\n"
    table, summary = app_client.predict(DATASET, "zxq", api_name="/tag_frequency")
    rows = {row[0]: row for row in table["data"]}
    assert rows["zxq"][1:] == ["3", "100%", "the trigger word"]
    assert rows["blue hair"][1:] == ["2", "67%", ""]
    assert "in every caption" not in summary  # only the trigger is in all three

    view = app_client.predict(DATASET, "zxq", 64, api_name="/show_dataset")
    pictures = [row[0] for row in view[0]["data"]]
    assert len(pictures) == 3 and "c.png (masked)" in pictures[2] and "(masked)" not in pictures[0]


def test_a_missing_model_says_what_to_download(app_client: Client, prepared) -> None:
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="hf download SmilingWolf/wd-vit-tagger-v3"):
        caption(app_client, Path("/nowhere/tagger"), "skip")


def test_make_regularization_pictures_from_the_demo_model(app_client: Client, app_server) -> None:
    status = app_client.predict(DEMO_MODEL_CHOICE, "a cat", 2, 3, 1, "", api_name="/make_reg_images")
    folder = app_server.projects.root / "reg" / "a-cat"
    assert f"Made 2 pictures of \"a cat\" in `{folder}`" in status
    assert sorted(p.name for p in folder.iterdir()) == ["a-cat-000003.png", "a-cat-000003.txt", "a-cat-000004.png",
                                                        "a-cat-000004.txt"]
