"""The app as an artist uses it (issue 18): single clicks and typing, uploads again, reloads.

Each test sets up its own dataset or run on the module's server and checks what the artist sees
and what is on disk: no caption lost, the view showing the run picked, settings kept.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from conftest import make_pattern_image
from playwright.sync_api import Page, expect

from browser.app_server import wait_for_page_load_events

pytestmark = pytest.mark.browser
APP_PORT = 8030  # app_server's first port for this module


def make_dataset(root: Path, name: str, captions: dict[str, str]) -> Path:
    folder = root / "datasets" / name
    folder.mkdir(parents=True)
    for i, (stem, caption) in enumerate(captions.items()):
        make_pattern_image((64, 64), i).save(folder / f"{stem}.png")
        (folder / f"{stem}.txt").write_text(caption + "\n", encoding="utf-8")
    return folder


def open_dataset(page: Page, name: str) -> None:
    wait_for_page_load_events(page)  # the page's own load fills the box: type after it, as a person does
    box = page.locator("#dataset-name input")
    box.fill(name)
    box.press("Enter")
    expect(page.locator("#dataset-report")).to_contain_text(f"{name}: ")


def caption_cell(page: Page, text: str):
    return page.locator("#dataset-table span").get_by_text(text, exact=True)


def test_typing_into_a_caption_cell_replaces_it_and_undo_brings_it_back(pages, app_server) -> None:
    folder = make_dataset(app_server.projects.root, "typing", {"a": "zxq, soft light", "b": "zxq, hard light"})
    page = pages.open()
    open_dataset(page, "typing")
    caption_cell(page, "zxq, soft light").click()  # one click selects the cell, as in a spreadsheet
    page.keyboard.type("Typed over")
    page.keyboard.press("Enter")
    expect(page.locator("#dataset-status")).to_have_text(re.compile("Saved 1 caption"))
    assert (folder / "a.txt").read_text(encoding="utf-8") == "Typed over\n"
    expect(caption_cell(page, "Typed over")).to_be_visible()

    page.locator("#dataset-undo").click()
    expect(page.locator("#dataset-status")).to_contain_text("Undid")
    assert (folder / "a.txt").read_text(encoding="utf-8") == "zxq, soft light\n"
    expect(caption_cell(page, "zxq, soft light")).to_be_visible()


def number_box(page: Page, elem_id: str):
    return page.locator(f"#{elem_id} input[type=number]").first


def test_a_preset_change_keeps_typed_values_and_letters_in_a_number_box_are_an_error(pages, app_server) -> None:
    make_dataset(app_server.projects.root, "presets", {"a": "zxq, one", "b": "zxq, two"})
    page = pages.open()
    page.get_by_role("tab", name="2 · Train").click()
    expect(number_box(page, "setting-rank")).to_have_value("32")  # the default preset, character
    for elem_id, text in (("setting-steps", "12"), ("setting-save_every", "6")):
        number_box(page, elem_id).fill(text)
        number_box(page, elem_id).press("Tab")
    page.locator("#setting-trigger input, #setting-trigger textarea").first.fill("zxq")
    page.locator("#setting-sample_prompts textarea").fill("zxq, smiling --n blurry")
    expect(page.locator("#train-prompt-rows")).to_contain_text("zxq, smiling")
    # A line typed later shows in the prompt rows too, so a later edit of a row keeps it.
    page.locator("#setting-sample_prompts textarea").press("End")
    page.locator("#setting-sample_prompts textarea").press("Enter")
    page.locator("#setting-sample_prompts textarea").press_sequentially("zxq, waving --w 64")
    expect(page.locator("#train-prompt-rows")).to_contain_text("zxq, waving")
    expect(page.locator("#train-prompt-rows")).to_contain_text("blurry")
    page.locator("#train-preset input").click()
    page.get_by_role("option", name="character-lite").click()

    expect(page.locator("#train-preset-info")).to_contain_text("From the preset: Rank 8, Alpha 4")
    expect(number_box(page, "setting-rank")).to_have_value("8")
    expect(number_box(page, "setting-steps")).to_have_value("12")
    expect(number_box(page, "setting-save_every")).to_have_value("6")
    expect(page.locator("#setting-trigger input, #setting-trigger textarea").first).to_have_value("zxq")
    expect(page.locator("#setting-sample_prompts textarea")).to_have_value("zxq, smiling --n blurry\nzxq, waving --w 64")

    page.locator("#train-dataset input").fill("presets")
    page.locator("#train-dataset input").press("Enter")
    rank = number_box(page, "setting-rank")
    rank.fill("")
    rank.press_sequentially("abc")
    rank.press("Tab")
    page.locator("#train-check").click()
    expect(page.locator(".toast-body")).to_contain_text('"Rank" needs a number')
    expect(page.locator("#train-plan")).to_have_text("")


PROGRESS = "#train-progress .ls-progress"


def submit_run(app_server, dataset: str, name: str, **settings) -> str:
    """A demo-model run queued as the Start button would queue it; returns its id."""
    from app.projects import DEMO_MODEL_CHOICE
    from app.run_plan import run_config

    tiny = {"resolution": 64, "rank": 4, "alpha": 4, "sample_every": 0, "save_every": 0, "trigger": "zxq", **settings}
    config = run_config(app_server.studio, dataset, DEMO_MODEL_CHOICE, "character-lite", name, tiny)
    return app_server.studio.runs.submit(name, config).id


def wait_run(app_server, run_id: str, condition) -> None:
    runs, seen = app_server.studio.runs, -1
    for _ in range(2000):
        run = runs.wait_for_change(run_id, seen, 5.0)
        if condition(run):
            return
        seen = run.version
    raise AssertionError(f"run {run_id} never got there: {runs.get(run_id)}")


def test_the_view_shows_the_picked_run_and_a_reload_brings_back_its_curve_and_settings(pages, app_server) -> None:
    make_dataset(app_server.projects.root, "runs", {"a": "zxq, one", "b": "zxq, two"})
    done = submit_run(app_server, "runs", "done", steps=3)
    wait_run(app_server, done, lambda run: run.status == "finished")
    long = submit_run(app_server, "runs", "long", steps=400)
    wait_run(app_server, long, lambda run: run.step >= 3)
    try:
        page = pages.open()  # a reload mid-run
        page.get_by_role("tab", name="2 · Train").click()
        expect(page.locator("#train-run-select input")).to_have_value(re.compile("long"))
        page.wait_for_function(f"() => document.querySelector('{PROGRESS}')?.dataset.status === 'training'")
        expect(page.locator("#train-loss-plot")).to_contain_text("smoothed")  # the curve so far
        expect(number_box(page, "setting-steps")).to_have_value("400")  # the run's settings in the form
        expect(page.locator("#train-run-name textarea, #train-run-name input").first).to_have_value("long")
        expect(page.locator("#train-base input")).to_have_value(re.compile("Demo model"))
        expect(page.locator("#train-stop")).to_have_text("Stop 'long'")

        page.locator("#train-run-select input").click()
        page.get_by_role("option", name=re.compile("^done")).click()
        page.wait_for_function(f"() => document.querySelector('{PROGRESS}')?.dataset.status === 'finished'")
        step_now = app_server.studio.runs.get(long).step
        wait_run(app_server, long, lambda run: run.step >= step_now + 3)  # the other run goes on meanwhile
        expect(page.locator("#train-progress-label")).to_contain_text("finished · step 3 / 3")
        expect(page.locator("#train-output-file")).to_contain_text("done.safetensors (")
        expect(page.locator("#train-open-generate")).to_be_enabled()
        expect(page.locator("#train-stop")).to_have_text("Stop 'done'")
        expect(page.locator("#train-stop")).to_be_disabled()
    finally:
        app_server.studio.runs.stop(long)
        wait_run(app_server, long, lambda run: not run.active)


def test_values_typed_while_the_page_loads_are_kept(pages, app_server, monkeypatch) -> None:
    """The page load fills the form with the last run's settings; what the artist typed meanwhile stays."""
    make_dataset(app_server.projects.root, "typed", {"a": "zxq, one", "b": "zxq, two"})
    run = submit_run(app_server, "typed", "earlier", steps=2)
    wait_run(app_server, run, lambda r: r.status == "finished")
    runs, listed = app_server.studio.runs, app_server.studio.runs.runs

    def slow_runs():  # a busy machine: the page-load answer comes seconds after the boxes appear
        time.sleep(4)
        return listed()

    monkeypatch.setattr(runs, "runs", slow_runs)
    page = pages.open()
    page.get_by_role("tab", name="2 · Train").click()
    number_box(page, "setting-steps").fill("77")
    number_box(page, "setting-steps").press("Tab")
    page.locator("#train-run-name textarea, #train-run-name input").first.fill("mine")
    expect(page.locator("#train-run-select input")).to_have_value(re.compile("earlier"), timeout=30_000)
    expect(number_box(page, "setting-rank")).to_have_value("4")  # untouched: the run's value
    expect(number_box(page, "setting-steps")).to_have_value("77")
    expect(page.locator("#train-run-name textarea, #train-run-name input").first).to_have_value("mine")


def test_a_reload_shows_the_last_dataset_with_its_trigger_and_fresh_problems(pages, app_server) -> None:
    folder = make_dataset(app_server.projects.root, "reload", {"a": "zxq, one", "b": "zxq, two"})
    (folder / "b.txt").unlink()
    page = pages.open()
    open_dataset(page, "reload")
    expect(page.locator("#dataset-table")).to_contain_text("no caption file")
    trigger = page.locator("#dataset-trigger textarea, #dataset-trigger input").first
    trigger.fill("zxq")
    trigger.press("Enter")
    expect(page.locator("#dataset-report")).to_contain_text('Trigger word "zxq"')
    # A caption typed for the picture without one: its Problems cell no longer says there is none.
    page.locator("#dataset-table [data-testid=cell-1-2]").click()
    page.keyboard.type("zxq, two")
    page.keyboard.press("Enter")
    expect(page.locator("#dataset-status")).to_have_text("Saved 1 caption.")
    expect(page.locator("#dataset-table")).not_to_contain_text("no caption file")

    pages.reload(page)
    expect(page.locator("#dataset-name input")).to_have_value("reload")
    expect(page.locator("#dataset-trigger textarea, #dataset-trigger input").first).to_have_value("zxq")
    expect(page.locator("#dataset-report")).to_contain_text('Trigger word "zxq" is in 2 of 2 captions')
    expect(caption_cell(page, "zxq, two")).to_be_visible()
