"""Choosing the epoch in a real browser: train 2 epochs with validation pictures, see both curves,
pick an epoch, find it in Generate."""

from __future__ import annotations

import re

import pytest
from conftest import make_pattern_image
from playwright.sync_api import expect

from browser.app_server import write_pictures
from browser.test_browser_workflow import (
    choose,
    open_tab,
    progress_reached,
    set_number,
    shot,
    type_into,
)

pytestmark = pytest.mark.browser
APP_PORT = 7990  # app_server's first port for this module
DATASET = "zxq-epochs"
RUN = "epochs"


def test_train_two_epochs_with_validation_pick_one_and_generate_with_it(pages, app_server, artifacts) -> None:
    write_pictures(app_server.projects.dataset_dir(DATASET, create=True), 8, make_pattern_image)
    page = pages.open()
    open_tab(page, "2 · Train")
    choose(page, "train-dataset", DATASET)
    choose(page, "train-base", "Demo model")
    type_into(page, "setting-trigger", "zxq")
    page.locator("#train-prompts-suggest").click()  # one caption-like row, one new-context row
    expect(page.locator("#setting-sample_prompts textarea")).to_have_value(re.compile(r"reading a book.*--n lowres"))
    expect(page.locator("#train-prompt-rows")).to_contain_text("sunny cafe")
    for name, value in {"resolution": "64", "rank": "4", "alpha": "4", "steps": "0", "epochs": "2", "batch_size": "2",
                        "sample_every": "0", "sample_steps": "2", "save_every": "0", "save_lora_every": "1",
                        "validation_split": "0.25"}.items():
        set_number(page, f"setting-{name}", value)
    type_into(page, "train-run-name", RUN)
    page.locator("#train-start").click()
    progress_reached(page, "el.dataset.status === 'finished'", timeout=240_000)

    plot = page.locator("#train-loss-plot")
    expect(plot).to_contain_text("smoothed")
    expect(plot).to_contain_text("validation")  # both curves in one plot
    expect(page.locator("#train-epoch-run input")).to_have_value(RUN)  # the panel follows the finished run
    expect(page.locator("#train-epoch-hint")).to_contain_text("Lowest validation loss")
    choose(page, "train-epoch-file", "epoch 1")
    page.locator("#train-use-epoch").click()
    expect(page.locator("#train-epoch-status")).to_contain_text(f"{RUN}.safetensors now holds {RUN}-000001.safetensors")
    runs = app_server.projects.runs_dir
    assert (runs / f"{RUN}.safetensors").read_bytes() == (runs / f"{RUN}-000001.safetensors").read_bytes()
    assert (runs / f"{RUN}-000002.safetensors").is_file()
    shot(page, artifacts, "20-choose-epoch.png")

    page = pages.open()  # a page opened now lists the files written since
    open_tab(page, "3 · Generate")
    page.locator("#gen-lora-0-file input").first.click()
    expect(page.get_by_role("option", name=re.compile(rf"{RUN}-000001\.safetensors"))).to_be_visible()
    expect(page.get_by_role("option", name=re.compile(rf"{RUN}-000002\.safetensors"))).to_be_visible()
    page.get_by_role("option", name=re.compile(rf"{RUN}-000001\.safetensors")).first.click()
    expect(page.locator("#gen-lora-0-file input")).to_have_value(re.compile(rf"{RUN}-000001"))
    shot(page, artifacts, "21-epoch-in-generate.png")
