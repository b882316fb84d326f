"""In a real browser: caption a folder with the tiny tagger from the Dataset tab, see masks, tags and undo."""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import expect
from tiny_captioners import write_tiny_tagger

pytestmark = pytest.mark.browser
APP_PORT = 7960  # app_server's first port for this module
DATASET = "tagme"


def test_caption_a_folder_with_the_tagger_from_the_dataset_tab(pages, app_server, artifacts) -> None:
    folder = app_server.projects.datasets_dir / DATASET
    folder.mkdir(parents=True)
    for name in ("a", "b", "c", "d"):
        Image.new("RGB", (64, 64), (0, 0, 255)).save(folder / f"{name}.png")
    (folder / "a.txt").write_text("zxq, hand written\n", encoding="utf-8")
    mask = np.zeros((64, 64), np.uint8)
    mask[:, :32] = 255
    Image.fromarray(mask, "L").save(folder / "d.mask.png")
    write_tiny_tagger(app_server.projects.models_dir / "taggers" / "tiny-tagger")  # after the app started

    page = pages.open()
    page.locator("#dataset-name input").fill(DATASET)
    page.locator("#dataset-name input").press("Enter")
    expect(page.locator("#dataset-table img[alt='d.png (masked)']:visible").first).to_be_visible()  # the mask over its thumbnail
    expect(page.locator("#dataset-table img[alt='a.png']:visible").first).to_be_visible()
    trigger = page.locator("#dataset-trigger textarea, #dataset-trigger input").first
    trigger.fill("zxq")
    trigger.press("Enter")

    page.get_by_text("Auto-caption the pictures").click()
    expect(page.locator("#dataset-caption-model input")).to_have_value(re.compile("tiny-tagger$"))
    expect(page.locator("#dataset-caption-help")).to_contain_text("1 model in")
    page.locator("#dataset-caption-run").click()
    expect(page.locator("#dataset-caption-status")).to_contain_text(
        "Captioned 3 pictures; left 1 that already had a caption.")
    expect(page.locator("#dataset-table")).to_contain_text("zxq, hatsune miku, blue hair, 1girl, ^_^, smile")
    assert (folder / "b.txt").read_text(encoding="utf-8") == "zxq, hatsune miku, blue hair, 1girl, ^_^, smile\n"

    page.locator("#dataset-caption-mode").get_by_text("overwrite", exact=True).click()
    page.locator("#dataset-caption-run").click()
    expect(page.locator("#dataset-caption-confirm-text")).to_contain_text("Overwrite 4 existing captions?")
    page.locator("#dataset-caption-cancel").click()
    expect(page.locator("#dataset-caption-status")).to_have_text("Nothing was changed.")
    assert (folder / "a.txt").read_text(encoding="utf-8") == "zxq, hand written\n"

    page.get_by_text("Tags: how often each one occurs").click()
    expect(page.locator("#dataset-tags")).to_contain_text("the trigger word")
    expect(page.locator("#dataset-tags")).to_contain_text("hatsune miku")
    page.screenshot(path=str(artifacts / "dataset-prep.png"), full_page=True)

    page.locator("#dataset-caption-undo").click()
    expect(page.locator("#dataset-caption-status")).to_contain_text("Undid 'Auto-caption with tiny-tagger (skip)'")
    expect(page.locator("#dataset-table")).not_to_contain_text("hatsune miku")
    assert not (folder / "b.txt").exists() and (folder / "a.txt").read_text(encoding="utf-8") == "zxq, hand written\n"
