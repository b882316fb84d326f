"""The artist's whole path in a real browser: pictures → captions → train → generate → tools.

The tests share one server and run in file order (the Generate test uses the LoRA the Train test
made). Each opens fresh pages; screenshots go to ``test-artifacts/`` for a human to look at, and
the assertions check what those screenshots show.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import make_pattern_image
from playwright.sync_api import Page, expect
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from app.run_view import format_bytes
from browser.app_server import wait_for_page_load_events, write_pictures

pytestmark = pytest.mark.browser
APP_PORT = 7890  # app_server's first port for this module
DATASET = "zxq-girl"
FIRST_RUN = "first"
TINY_RUN = {"resolution": "64", "rank": "4", "alpha": "4", "steps": "12", "sample_every": "6", "sample_steps": "2",
            "save_every": "0"}
PROGRESS = "#train-progress .ls-progress"


# --- helpers: how a person operates gradio's widgets ------------------------------------------------


def open_tab(page: Page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def type_into(page: Page, elem_id: str, text: str) -> None:
    box = page.locator(f"#{elem_id} textarea, #{elem_id} input").first
    box.fill(text)
    box.press("Tab")


def set_number(page: Page, elem_id: str, value: str) -> None:
    box = page.locator(f"#{elem_id} input[type=number]").first
    box.fill(value)
    box.press("Enter" if page.locator(f"#{elem_id} input[type=range]").count() else "Tab")


def choose(page: Page, elem_id: str, option: str) -> None:
    page.locator(f"#{elem_id} input").first.click()
    page.get_by_role("option", name=option).first.click()
    expect(page.locator(f"#{elem_id} input").first).to_have_value(re.compile(re.escape(option)))


def progress_reached(page: Page, condition: str, timeout: float = 120_000) -> None:
    """Wait until the progress bar's data attributes satisfy a JS ``condition`` on ``el``."""
    page.wait_for_function(
        f"() => {{ const el = document.querySelector('{PROGRESS}'); return !!el && ({condition}); }}",
        timeout=timeout)


def assert_inside(page: Page, inner: str, outer: str) -> None:
    """``inner`` lies within ``outer`` (nothing cut off at the right or the bottom)."""
    a, b = page.locator(inner).first.bounding_box(), page.locator(outer).first.bounding_box()
    assert a["x"] + a["width"] <= b["x"] + b["width"] + 1 and a["y"] + a["height"] <= b["y"] + b["height"] + 1, \
        f"{inner} {a} sticks out of {outer} {b}"


def assert_below(page: Page, lower: str, upper: str) -> None:
    """``lower`` starts below ``upper`` ends (a floating label does not cover it)."""
    a, b = page.locator(lower).first.bounding_box(), page.locator(upper).first.bounding_box()
    assert a["y"] >= b["y"] + b["height"] - 1, f"{lower} {a} is under {upper} {b}"


def assert_apart(page: Page, one: str, other: str) -> None:
    """``one`` and ``other`` do not overlap (a long label does not run under a button)."""
    a, b = page.locator(one).first.bounding_box(), page.locator(other).first.bounding_box()
    assert (a["x"] + a["width"] <= b["x"] + 1 or b["x"] + b["width"] <= a["x"] + 1
            or a["y"] + a["height"] <= b["y"] + 1 or b["y"] + b["height"] <= a["y"] + 1), f"{one} {a} overlaps {other} {b}"


def assert_upload_prompt_shown(page: Page, upload: str) -> None:
    """The empty upload area shows its whole prompt: not cut off, not under the component's label."""
    assert_inside(page, f"{upload} [data-testid=upload-text]", f"{upload} .upload-container")
    assert_below(page, f"{upload} [data-testid=upload-icon]", f"{upload} [data-testid=block-label]")


def shot(page: Page, artifacts: Path, name: str) -> None:
    page.screenshot(path=str(artifacts / name), full_page=True)


# --- the workflow -------------------------------------------------------------------------------------


def test_upload_pictures_and_edit_a_caption(pages, app_server, artifacts, tmp_path: Path) -> None:
    page = pages.open()
    expect(page.locator("#dataset-name")).to_be_visible()
    wait_for_page_load_events(page)
    type_into(page, "dataset-name", DATASET)
    page.locator("#dataset-name input").press("Enter")
    assert_upload_prompt_shown(page, "#dataset-upload")
    page.set_viewport_size({"width": 520, "height": 1000})  # a narrow window: the label takes two lines
    assert_upload_prompt_shown(page, "#dataset-upload")
    page.set_viewport_size({"width": 1400, "height": 1000})
    files = write_pictures(tmp_path / "pictures", 8, make_pattern_image)
    duplicate = tmp_path / "pictures" / "pic00_copy.png"
    duplicate.write_bytes(files[0].read_bytes())
    page.locator("#dataset-upload input[type=file]").set_input_files([str(f) for f in [*files, duplicate]])
    expect(page.locator("#dataset-status")).to_have_text("Added 9 pictures and 8 caption files.")
    # The copy is flagged on its row with what to do; the artist selects it and removes it.
    expect(page.locator("#dataset-table")).to_contain_text("pic00_copy.png is an exact copy of pic00.png")
    page.locator("#dataset-table span").get_by_text("pic00_copy.png", exact=True).click()
    expect(page.locator("#dataset-selected textarea, #dataset-selected input").first).to_have_value("pic00_copy.png")
    page.locator("#dataset-remove").click()
    expect(page.locator("#dataset-status")).to_have_text("Removed pic00_copy.png and its caption.")
    expect(page.locator("#dataset-table img[alt='pic07.png']").first).to_be_visible()  # thumbnails
    shown = page.eval_on_selector_all("#dataset-table img[alt^=pic]", "images => images.map(i => i.alt)")
    assert sorted(set(shown)) == [f"pic{i:02d}.png" for i in range(8)]
    expect(page.locator("#dataset-report")).to_contain_text("8 usable pictures of 8")
    # At the default 512 px check the 64 px pictures are flagged, with what to do about it.
    expect(page.locator("#dataset-table")).to_contain_text("smaller than the 512 px training resolution")
    expect(page.locator("#dataset-issues")).to_contain_text("Replace it with a larger original")
    # Layout: the problems table fits its box ("What to do" is not cut off at the right).
    assert_inside(page, "#dataset-issues table", "#dataset-issues")

    page.locator("#dataset-table").get_by_text("zxq, picture 3", exact=True).dblclick()
    editor = page.locator("#dataset-table textarea, #dataset-table input[type=text]").first
    editor.fill("zxq, picture 3, red scarf")
    editor.press("Enter")
    expect(page.locator("#dataset-status")).to_have_text("Saved 1 caption.")
    sidecar = app_server.projects.dataset_dir(DATASET) / "pic03.txt"
    assert sidecar.read_text(encoding="utf-8").strip() == "zxq, picture 3, red scarf"

    type_into(page, "dataset-trigger", "zxq")
    set_number(page, "dataset-resolution", "64")
    page.locator("#dataset-check").click()
    expect(page.locator("#dataset-report")).to_contain_text('Trigger word "zxq" is in 8 of 8 captions')
    expect(page.locator("#dataset-table")).not_to_contain_text("smaller than")
    shot(page, artifacts, "01-dataset.png")


def test_train_the_demo_model_and_watch_it(pages, app_server, artifacts) -> None:
    page = pages.open()
    open_tab(page, "2 · Train")
    expect(page.locator("#train-start")).to_be_visible()
    expect(page.locator("#train-dataset input")).to_have_value(DATASET)
    choose(page, "train-base", "Demo model")
    choose(page, "train-preset", "character-lite")
    expect(page.locator("#setting-rank input")).to_have_value("8")  # the preset filled the form
    expect(page.locator("#train-preset-info")).to_contain_text("Small and quick")
    expect(page.locator("#setting-lr")).to_contain_text("Learning rate of the UNet LoRA.")  # help text
    for name, value in TINY_RUN.items():
        set_number(page, f"setting-{name}", value)
    type_into(page, "setting-trigger", "zxq")
    type_into(page, "train-run-name", FIRST_RUN)

    page.locator("#train-check").click()
    plan = page.locator("#train-plan")
    expect(plan).to_contain_text("8 images per epoch")
    expect(plan).to_contain_text(re.compile(rf"{FIRST_RUN}\.safetensors, \d+\.\d kB \(24 layers, rank 4, fp16\)"))
    planned = re.search(r"safetensors, (\d+\.\d kB)", plan.inner_text()).group(1)
    expect(plan).to_contain_text("Estimate on CPU")

    page.locator("#train-start").click()
    progress_reached(page, "+el.dataset.step >= 1 || el.dataset.status === 'finished'")
    running = page.locator(PROGRESS).get_attribute("data-status") == "training"
    if running:  # caught mid-run: step/total and ETA are on the bar
        expect(page.locator("#train-progress-label")).to_contain_text(re.compile(r"step \d+ / 12"))
        shot(page, artifacts, "02-train-running.png")
    expect(page.locator("#train-samples img").first).to_be_visible(timeout=120_000)
    progress_reached(page, "el.dataset.status === 'finished'")
    label = page.locator("#train-progress-label")
    expect(label).to_contain_text("finished · step 12 / 12")
    expect(page.locator("#train-loss-plot")).to_contain_text("smoothed")  # the curve's legend: data arrived
    # the two suggested prompts (caption-like, new context; a preset change keeps them) at steps 6 and 12
    expect(page.locator("#train-samples img")).to_have_count(4)
    # One file, one size: the plan's, the status line's and the download button's agree with the file's.
    expect(page.locator("#train-status")).to_contain_text(f"Finished: {FIRST_RUN}.safetensors ({planned})")
    expect(page.locator("#train-output-file")).to_contain_text(f"{FIRST_RUN}.safetensors ({planned})")
    expect(page.locator("#train-open-generate")).to_be_enabled()
    size = (app_server.projects.runs_dir / f"{FIRST_RUN}.safetensors").stat().st_size
    assert format_bytes(size) == planned
    shot(page, artifacts, "03-train-finished.png")


def second_lora(first: Path, folder: Path) -> Path:
    """A different LoRA of the same shape: the first one's up-weights scaled by -1.5."""
    with safe_open(str(first), "pt") as handle:
        metadata = {k: v for k, v in handle.metadata().items() if k != "sshs_model_hash"}
    tensors = {k: v * -1.5 if "lora_up" in k else v for k, v in load_file(str(first)).items()}
    path = folder / "inverse.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    return path


def test_generate_with_the_new_lora_and_a_second_one(pages, app_server, artifacts, tmp_path: Path) -> None:
    first = app_server.projects.runs_dir / f"{FIRST_RUN}.safetensors"
    page = pages.open()
    open_tab(page, "2 · Train")
    expect(page.locator("#train-open-generate")).to_be_enabled()  # the reloaded page shows the last run
    page.locator("#train-open-generate").click()
    expect(page.locator("#gen-run")).to_be_visible()
    expect(page.locator("#gen-lora-0-file input")).to_have_value("first.safetensors (trained here)")
    expect(page.locator("#gen-base input")).to_have_value(re.compile("Demo model"))  # the base it was trained on

    page.locator("#gen-add-lora").click()
    expect(page.locator("#gen-lora-1-file")).to_be_visible()
    with page.expect_file_chooser() as chooser:
        page.locator("#gen-lora-1-upload").click()
    chooser.value.set_files(str(second_lora(first, tmp_path)))
    expect(page.locator("#gen-lora-1-file input")).to_have_value("inverse.safetensors (uploaded)")
    set_number(page, "gen-lora-0-weight", "0.8")
    set_number(page, "gen-lora-1-weight", "-0.5")
    set_number(page, "gen-steps", "2")
    set_number(page, "gen-batch", "2")
    page.locator("#gen-seed input").fill("7")
    page.locator("#gen-seed input").press("Tab")
    page.locator("#gen-run").click()

    expect(page.locator("#gen-gallery img")).to_have_count(2, timeout=120_000)
    infotext = page.locator("#gen-infotext textarea")
    expect(infotext).to_have_value(re.compile(r"<lora:first:0\.8> <lora:inverse:-0\.5>"))
    expect(infotext).to_have_value(re.compile(r"Seed: 7,"))
    expect(page.locator("#gen-notes")).to_contain_text("Made 2 images with first × 0.8, inverse × -0.5")
    assert len(list((app_server.projects.outputs_dir / "images").glob("*.png"))) == 2
    # Layout: a slot's buttons fill its row (no grey gap under them); the copy button is not under the label.
    for button in ("upload", "remove"):
        assert page.locator(f"#gen-lora-1-{button}").bounding_box()["height"] >= \
            page.locator("#gen-lora-1-weight").bounding_box()["height"] - 1
    assert_apart(page, "#gen-infotext label > span", "#gen-infotext button[title=Copy]")
    shot(page, artifacts, "04-generate.png")


def test_closed_tab_keeps_training_and_stop_leaves_a_resumable_checkpoint(pages, app_server, artifacts) -> None:
    page = pages.open()
    open_tab(page, "2 · Train")
    choose(page, "train-base", "Demo model")
    for name, value in {**TINY_RUN, "steps": "400", "sample_every": "0"}.items():
        set_number(page, f"setting-{name}", value)
    type_into(page, "train-run-name", "long")
    page.locator("#train-start").click()
    progress_reached(page, "el.dataset.status === 'training' && +el.dataset.step >= 1")
    page.context.close()  # the artist closes the tab; training must go on

    page = pages.open()
    open_tab(page, "2 · Train")
    expect(page.locator("#train-run-select input")).to_have_value(re.compile("long"))
    progress_reached(page, "el.dataset.status === 'training' && +el.dataset.step >= 3")
    expect(page.locator("#train-progress-label")).to_contain_text("ETA")
    expect(page.locator("#train-progress-label")).to_contain_text("/ 400")
    expect(page.locator("#train-loss-plot")).to_contain_text("smoothed")  # the curve so far, not just new steps
    shot(page, artifacts, "05-train-reattached.png")

    page.locator("#train-stop").click()
    progress_reached(page, "el.dataset.status === 'stopped'")
    stopped_at = int(page.locator(PROGRESS).get_attribute("data-step"))
    assert 3 <= stopped_at < 400
    expect(page.locator("#train-status")).to_contain_text(f"It can be resumed from step {stopped_at}")
    checkpoint = app_server.projects.runs_dir / "long_run" / "checkpoints" / f"step-{stopped_at:06d}"
    assert checkpoint.is_dir()
    assert (app_server.projects.runs_dir / "long.safetensors").is_file()  # a stopped run still exports

    page.locator("#train-runs-accordion").get_by_text("All runs, and resume a run").click()
    expect(page.locator("#train-runs")).to_contain_text("stopped")
    choose(page, "train-resume-select", "long")
    page.locator("#train-resume").click()
    progress_reached(page, f"el.dataset.status === 'training' && +el.dataset.step > {stopped_at}")
    expect(page.locator("#train-progress-label")).to_contain_text(f"resumed from step {stopped_at}")
    shot(page, artifacts, "06-train-resumed.png")
    page.locator("#train-stop").click()
    progress_reached(page, "el.dataset.status === 'stopped'")


def test_tools_inspect_shows_the_spectrum(pages, app_server, artifacts) -> None:
    page = pages.open()
    open_tab(page, "4 · Tools")
    assert_upload_prompt_shown(page, "#tools-upload")
    first = app_server.projects.runs_dir / f"{FIRST_RUN}.safetensors"
    choose(page, "tools-inspect-file", f"{FIRST_RUN}.safetensors")
    page.locator("#tools-inspect-run").click()
    summary = page.locator("#tools-inspect-summary textarea")
    expect(summary).to_have_value(re.compile(rf"{FIRST_RUN}\.safetensors: LoRA for SD 1\.x"))
    expect(summary).to_have_value(re.compile("Trigger phrase: zxq"))
    expect(page.locator("#tools-inspect-plot img")).to_be_visible()
    assert_below(page, "#tools-inspect-plot img", "#tools-inspect-plot [data-testid=block-label]")  # title not hidden
    assert first.is_file()
    shot(page, artifacts, "07-tools-inspect.png")
