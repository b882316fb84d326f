"""Every endpoint of the app, driven through gradio_client as a script would, errors included.

One server for the module (tiny demo model, 64 px pictures, a handful of steps); the tests run
in file order: pictures first, then a run, then generation and tools on its LoRA.
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import pytest
from browser.app_server import upload_pictures, write_pictures
from conftest import make_pattern_image
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from app.projects import DEMO_MODEL_CHOICE

APP_PORT = 7870  # app_server's first port for this module
DEMO = DEMO_MODEL_CHOICE
TINY = {"steps": 4, "rank": 4, "alpha": 4, "resolution": 64, "sample_every": 2, "sample_steps": 2, "save_every": 0,
        "trigger": "zxq"}
DATASET = "api-set"
EDITED = "api-edit"

ENDPOINTS = {"/show_dataset", "/upload_images", "/import_folder", "/save_captions", "/add_trigger",
             "/replace_in_captions", "/remove_picture", "/preset_settings", "/check_training", "/start_training",
             "/watch_run",
             "/stop_training", "/save_checkpoint_now", "/make_samples_now", "/resume_training", "/list_runs",
             "/generate", "/open_in_generate", "/upload_loras", "/inspect_lora", "/resize_lora", "/merge_loras",
             "/bake_checkpoint", "/suggest_sample_prompts", "/sample_prompt_lines", "/epoch_files", "/use_epoch",
             "/epoch_grid", "/continue_run"}


@pytest.fixture(scope="module")
def dataset(app_client: Client, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Six captioned 64 px pictures uploaded through the endpoint."""
    return upload_pictures(app_client, DATASET, tmp_path_factory.mktemp("api-pictures"), 6, make_pattern_image)


@pytest.fixture(scope="module")
def trained(app_server, app_client: Client, dataset: str) -> Path:
    """A finished demo-model run's LoRA file, trained through the endpoints."""
    run_id, plan, _ = app_client.predict(DATASET, DEMO, "character-lite", "api-run", TINY, api_name="/start_training")
    planned = re.search(r"api-run\.safetensors, (\d+\.\d kB) \(24 layers, rank 4, fp16\)", plan)
    progress, status, *_ = app_client.predict(run_id, api_name="/watch_run")  # returns when the run ends
    assert 'data-status="finished"' in progress, status
    output = app_server.projects.runs_dir / "api-run.safetensors"
    assert output.is_file() and f"api-run.safetensors` ({planned.group(1)})" in status  # the size planned
    return output


def rows(table: dict) -> list[list]:
    """A Dataframe's rows as gradio_client returns them."""
    return table["data"]


def file_path(value) -> Path:
    """A File output as gradio_client returns it (FileData dict when files are not downloaded)."""
    return Path(value["path"] if isinstance(value, dict) else value)


def as_table(data: list[list], headers: list[str]) -> dict:
    return {"headers": headers, "data": data, "metadata": None}


def expect_error(text: str, call, *args, title: str | None = None, **kwargs) -> str:
    """The call fails with a page message containing ``text`` (and the toast ``title``), no traceback."""
    with pytest.raises(AppError) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert text in message, message
    assert "Traceback" not in message and "internal error" not in message
    if title is not None:
        assert info.value.title == title
    return message


def test_every_working_event_is_a_named_endpoint(app_client: Client) -> None:
    named = set(app_client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert ENDPOINTS <= named, ENDPOINTS - named


def test_the_example_pictures_make_a_captioned_dataset_to_try(app_client: Client, app_server) -> None:
    table, report, issues, status, name = app_client.predict("", "", 64, api_name="/add_examples")
    assert status == "Added 8 pictures and 8 caption files." and name["value"] == "example"
    data = rows(table)
    assert len(data) == 8 and all("blue scarf" in row[2] for row in data)
    assert "8 usable pictures of 8" in report
    folder = app_server.projects.dataset_dir("example")
    assert sorted(p.suffix for p in folder.iterdir()).count(".txt") == 8


def test_upload_pictures_then_edit_captions(app_client: Client, app_server, tmp_path: Path) -> None:
    files = write_pictures(tmp_path / "in", 6, make_pattern_image)
    table, report, issues, status, *_ = app_client.predict(
        EDITED, [handle_file(f) for f in files], "zxq", 64, api_name="/upload_images")
    assert status == "Added 6 pictures and 6 caption files."
    headers, data = table["headers"], rows(table)
    assert [row[1] for row in data] == [f"pic{i:02d}.png" for i in range(6)]
    assert data[2][2] == "zxq, picture 2" and "6 usable pictures of 6" in report
    folder = app_server.projects.dataset_dir(EDITED)

    data[2][2] = "zxq, picture 2, smiling"
    _, _, _, status = app_client.predict(EDITED, as_table(data, headers), "zxq", 64, api_name="/save_captions")
    assert status == "Saved 1 caption."
    assert (folder / "pic02.txt").read_text(encoding="utf-8").strip() == "zxq, picture 2, smiling"

    table, _, _, status = app_client.predict(EDITED, as_table(data, headers), "picture", "photo", "zxq", 64,
                                             api_name="/replace_in_captions")
    assert status == 'Replaced "picture" in 6 captions.' and rows(table)[0][2] == "zxq, photo 0"
    (folder / "pic05.txt").write_text("a photo", encoding="utf-8")
    table, report, issues, _ = app_client.predict(EDITED, "zxq", 64, api_name="/show_dataset")
    assert rows(table)[5][2] == "a photo"
    table, report, _, status = app_client.predict(EDITED, table, "zxq", 64, api_name="/add_trigger")
    assert status == 'Added "zxq" to 1 caption.' and rows(table)[5][2] == "zxq, a photo"
    assert "in 6 of 6 captions" in report

    table, report, _, status, selected = app_client.predict(EDITED, "pic05.png", "zxq", 64, api_name="/remove_picture")
    assert status == "Removed pic05.png and its caption." and selected == ""
    assert len(rows(table)) == 5 and not (folder / "pic05.png").exists() and not (folder / "pic05.txt").exists()
    expect_error("No picture is selected", app_client.predict, EDITED, "", "zxq", 64, api_name="/remove_picture")
    expect_error("is not a valid file name", app_client.predict, EDITED, "../../etc/passwd", "zxq", 64,
                 api_name="/remove_picture")


def test_upload_and_import_errors_say_what_to_do(app_client: Client, app_server, tmp_path: Path) -> None:
    expect_error("No files were received", app_client.predict, EDITED, [], "", 64, api_name="/upload_images")
    picture = write_pictures(tmp_path / "one", 1, make_pattern_image)[0]
    expect_error("Name the dataset first", app_client.predict, "", [handle_file(picture)], "", 64,
                 api_name="/upload_images")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"this is not a png")
    notes = tmp_path / "notes.pdf"
    notes.write_bytes(b"%PDF-1.4")
    table, _, issues, status, *_ = app_client.predict(
        "with-broken", [handle_file(broken), handle_file(notes),
                        *[handle_file(f) for f in write_pictures(tmp_path / "ok", 2, make_pattern_image)]],
        "", 64, api_name="/upload_images")
    assert "Skipped 1: notes.pdf: not a picture type" in status
    broken_row = next(row for row in rows(table) if row[1] == "broken.png")
    assert "not an image this program can read" in broken_row[3]
    assert any(issue[1] == "broken.png" and issue[0] == "✖" for issue in rows(issues))
    expect_error("is not a folder", app_client.predict, EDITED, str(tmp_path / "nowhere"), "", 64,
                 api_name="/import_folder")


def test_preset_settings_and_plan(app_client: Client, dataset: str) -> None:
    values = app_client.predict("style", api_name="/preset_settings")
    assert 64 in values and "full" in values  # rank 64 on every transformer layer
    plan = app_client.predict(DATASET, DEMO, "character-lite", "", TINY, api_name="/check_training")
    assert "6 images per epoch" in plan and re.search(r"\d+\.\d kB \(24 layers", plan) and "Estimate on CPU" in plan
    assert "Demo model" in plan


@pytest.mark.parametrize("dataset_name, base, settings, message", [
    ("", DEMO, {}, "No dataset is chosen"),
    ("never-made", DEMO, {}, "There is no dataset called 'never-made'"),
    (DATASET, "", {}, "No base model is chosen"),
    (DATASET, "/no/such/model.safetensors", {}, "Base model not found: /no/such/model.safetensors"),
    (DATASET, DEMO, {"rank": 0}, "\"Rank\" = 0 is out of range"),
    (DATASET, DEMO, {"rnk": 4}, "Did you mean 'rank'?"),
])
def test_start_refuses_bad_input_with_a_clear_message(app_client: Client, dataset: str, dataset_name: str, base: str,
                                                      settings: dict, message: str) -> None:
    # ``dataset`` has pictures, so each case fails for its own reason
    expect_error(message, app_client.predict, dataset_name, base, "character-lite", "", settings,
                 api_name="/start_training")


def test_start_with_an_empty_dataset_says_there_are_no_pictures(app_client: Client, app_server) -> None:
    app_server.projects.dataset_dir("empty-set", create=True)
    expect_error("Found 0 images", app_client.predict, "empty-set", DEMO, "character-lite", "", TINY,
                 api_name="/start_training")


def test_run_commands_need_a_run(app_client: Client) -> None:
    for endpoint in ("/stop_training", "/save_checkpoint_now", "/make_samples_now"):
        expect_error("No run is selected", app_client.predict, "", api_name=endpoint)
    expect_error("Choose a run to resume first", app_client.predict, "", api_name="/resume_training")


def test_a_run_trains_and_lists(app_client: Client, app_server, trained: Path) -> None:
    runs, _, _ = app_client.predict(api_name="/list_runs")
    row = next(r for r in rows(runs) if r[0] == "api-run")
    assert "finished" in row[1] and row[2] == "4 / 4" and row[4] == str(trained)
    samples = sorted((app_server.projects.runs_dir / "api-run_run" / "samples").glob("*.png"))
    assert [p.name for p in samples] == ["step-000002-0.png", "step-000004-0.png"]


def test_generate_mixes_two_loras(app_client: Client, app_server, trained: Path) -> None:
    resized_text, resized = app_client.predict(str(trained), 2, None, "api-run-r2", api_name="/resize_lora")
    assert "rank" in resized_text and file_path(resized).is_file()
    slots = [{"file": str(trained), "weight": 0.8, "enabled": True},
             {"file": file_path(resized).stem, "weight": -0.5, "enabled": True}]
    gallery, infotext, notes = app_client.predict(DEMO, slots, "zxq, a portrait", "", 7, 2, 5.0, 0, 0, "Euler a", 2,
                                                  False, api_name="/generate")
    assert len(gallery) == 2 and all(Path(item["image"]["path"]).is_file() for item in gallery)
    assert "<lora:api-run:0.8>" in infotext and "<lora:api-run-r2:-0.5>" in infotext and "Seed: 7" in infotext
    assert "api-run × 0.8, api-run-r2 × -0.5" in notes


def test_generate_with_split_and_block_weights(app_client: Client, trained: Path) -> None:
    slot = {"file": str(trained), "weight": 1.0, "te_weight": 0.2, "unet_weight": 0.9, "blocks": "down=1,mid=0,up=0.5"}
    _, infotext, _ = app_client.predict(DEMO, [slot], "zxq", "", 5, 1, 5.0, 0, 0, "Euler a", 1, False,
                                        api_name="/generate")
    assert "<lora:api-run:0.2:0.9:lbw=1,1,0,0.5,0.5>" in infotext  # BASE, 1 down, MID, 2 up (tiny UNet)
    expect_error("Cannot read the block weights", app_client.predict, DEMO, [{**slot, "blocks": "up=lots"}], "zxq", "",
                 5, 1, 5.0, 0, 0, "Euler a", 1, False, api_name="/generate")


def test_generate_compare_with_lora_off(app_client: Client, trained: Path) -> None:
    gallery, _, _ = app_client.predict(DEMO, [{"file": str(trained), "weight": 1.0}], "zxq", "", 3, 2, 5.0, 0, 0,
                                       "Euler a", 1, True, api_name="/generate")
    assert [item["caption"] for item in gallery] == ["seed 3", "seed 3 · LoRA off"]


def test_generate_refuses_bad_lora_files(app_client: Client, tmp_path: Path) -> None:
    pickle = tmp_path / "evil.ckpt"
    pickle.write_bytes(b"\x80\x04\x95 pickled")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all")
    for path, text in ((pickle, "is a pickle"), (garbage, "garbage.safetensors"),
                       (tmp_path / "missing.safetensors", "LoRA file not found")):
        message = expect_error(text, app_client.predict, DEMO, [{"file": str(path), "weight": 1}], "zxq", "", 1, 1, 5.0,
                               0, 0, "Euler a", 1, False, api_name="/generate", title="LoRA file problem")
        assert path.name in message
    expect_error("No base model is chosen", app_client.predict, "", [], "zxq", "", 1, 1, 5.0, 0, 0, "Euler a", 1, False,
                 api_name="/generate")
    expect_error("Unknown", app_client.predict, DEMO, [], "zxq", "", 1, 1, 5.0, 0, 0, "Sampler of Dreams", 1, False,
                 api_name="/generate")


def test_inspect_merge_and_bake(app_client: Client, app_server, trained: Path, dataset: str) -> None:
    summary, plot = app_client.predict(str(trained), api_name="/inspect_lora")
    assert "api-run.safetensors: LoRA for SD 1.x" in summary and "Trigger phrase: zxq" in summary
    assert file_path(plot).stat().st_size > 1000
    text, merged = app_client.predict([str(trained), str(trained)], "0.5, 0.25", None, "half", api_name="/merge_loras")
    assert file_path(merged).name == "half.safetensors" and file_path(merged).is_file()
    expect_error("2 files but 1 weights", app_client.predict, [str(trained), str(trained)], "0.5", None, "x",
                 api_name="/merge_loras")
    text, checkpoint = app_client.predict(DEMO, [str(trained)], "1", "demo-baked", api_name="/bake_checkpoint")
    baked = app_server.projects.models_dir / "demo-baked.safetensors"
    assert file_path(checkpoint).name == "demo-baked.safetensors" and baked.stat().st_size > 100_000
    # A baked checkpoint is a base model, listed with them and never with the LoRAs (also one an
    # earlier version baked into outputs/), and it trains like one: the plan reads its layers.
    older = app_server.projects.outputs_dir / "older-baked.safetensors"
    shutil.copyfile(baked, older)
    projects = app_server.projects
    assert {str(baked), str(older)} <= set(projects.base_model_choices())
    assert baked not in projects.lora_files() and older not in projects.lora_files() and trained in projects.lora_files()
    plan = app_client.predict(DATASET, str(baked), "character-lite", "", TINY, api_name="/check_training")
    assert "(24 layers, rank 4, fp16)" in plan
    older.unlink()
    expect_error("Choose at least one LoRA file", app_client.predict, DEMO, [], "", "x", api_name="/bake_checkpoint")


def test_open_in_generate_fills_a_slot(app_client: Client, trained: Path) -> None:
    slots, version, base = app_client.predict(str(trained), DEMO, [{"id": "a", "file": "", "weight": 1.0}], 3,
                                              api_name="/open_in_generate")
    assert slots[0]["file"] == str(trained) and version == 4 and base == DEMO
    expect_error("no finished LoRA", app_client.predict, "", "", [], 0, api_name="/open_in_generate")


def test_stop_mid_run_leaves_a_resumable_checkpoint(app_client: Client, app_server, dataset: str) -> None:
    long_run = {**TINY, "steps": 500, "sample_every": 0}
    run_id, _, _ = app_client.predict(DATASET, DEMO, "character-lite", "api-long", long_run, api_name="/start_training")
    run = app_server.studio.runs.get(run_id)
    deadline = time.monotonic() + 120
    while run.step < 2:
        assert time.monotonic() < deadline and run.active, (run.status, run.error)
        run = app_server.studio.runs.wait_for_change(run_id, run.version, 5)
    app_client.predict(run_id, api_name="/make_samples_now")
    app_client.predict(run_id, api_name="/save_checkpoint_now")
    while not (run.samples and run.checkpoints):  # both happen after the step in flight
        assert time.monotonic() < deadline and run.active, (run.status, run.error)
        run = app_server.studio.runs.wait_for_change(run_id, run.version, 5)
    assert run.samples[0][0].is_file() and run.checkpoints[0][1].is_dir()
    queued_id, _, _ = app_client.predict(DATASET, DEMO, "character-lite", "api-next", {**TINY, "steps": 2},
                                         api_name="/start_training")
    assert app_server.studio.runs.get(queued_id).status == "queued"  # one run at a time
    app_client.predict(run_id, api_name="/stop_training")
    progress, status, *_ = app_client.predict(run_id, api_name="/watch_run")
    assert 'data-status="stopped"' in progress and "It can be resumed from step" in status
    progress, _, *_ = app_client.predict(queued_id, api_name="/watch_run")  # then the queued one runs
    assert 'data-status="finished"' in progress
    stopped = app_server.studio.runs.get(run_id)
    checkpoint = app_server.projects.runs_dir / "api-long_run" / "checkpoints" / f"step-{stopped.step:06d}"
    assert 2 <= stopped.step < 500 and checkpoint.is_dir()

    runs, resumable, _ = app_client.predict(api_name="/list_runs")
    assert "api-long" in str(resumable["choices"])  # offered under "Resume a run"
    resumed_id, _ = app_client.predict("api-long", api_name="/resume_training")
    resumed = app_server.studio.runs.get(resumed_id)
    while resumed.start_step == 0 and resumed.active:
        resumed = app_server.studio.runs.wait_for_change(resumed_id, resumed.version, 5)
    assert resumed.start_step == stopped.step
    assert [step for step, _, _ in resumed.losses][: stopped.step] == list(range(1, stopped.step + 1))  # curve kept
    app_client.predict(resumed_id, api_name="/stop_training")
    progress, _, *_ = app_client.predict(resumed_id, api_name="/watch_run")
    assert 'data-status="stopped"' in progress
