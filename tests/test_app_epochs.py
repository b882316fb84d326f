"""The app's epoch tools on a finished 2-epoch run: prompt rows, epoch list with validation losses,
Use this epoch, Continue for N more, the epoch grid, and the validation curve in the loss plot."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import write_image_folder

from app import run_epochs
from app.run_view import loss_frame
from app.runs import RunState, apply_event
from app.studio import Studio
from trainer.config.presets import resolve_config
from trainer.core.errors import ConfigError, StudioError
from trainer.lora.sidecars import json_path, preview_path
from trainer.train.events import LoraSaved, RunFinished, ValidationMeasured
from trainer.train.loop import train

RUN = "zxq"


@pytest.fixture(scope="module")
def studio_run(tiny_sd1_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("studio")
    studio = Studio.create(root)
    data = write_image_folder(studio.projects.datasets_dir / "pics")
    (data / "img00.txt").write_text("zxq, a girl with a red scarf", encoding="utf-8")
    config = resolve_config("character", overrides={
        "base": str(tiny_sd1_dir), "data": str(data), "output": str(studio.projects.run_output(RUN)), "rank": 4,
        "alpha": 2, "epochs": 2, "batch_size": 3, "seed": 3, "lr": 3e-3, "min_snr_gamma": 0.0, "save_lora_every": 1,
        "validation_split": 0.25, "sample_steps": 2, "trigger": "zxq", "sample_prompts": ["zxq, portrait"]})
    events = list(train(config))
    yield studio, config, events
    studio.close()


def test_prompt_rows_default_from_the_trigger_and_captions_and_become_kohya_lines(studio_run):
    studio, _, _ = studio_run
    rows = run_epochs.default_prompt_rows(studio, "pics", "zxq")
    assert rows[0][0] == "zxq, a girl with a red scarf"  # caption-like
    assert rows[1][0] == f"zxq, {run_epochs.NEW_CONTEXT}"  # a new context: does it still follow the prompt?
    rows[1][2:5] = [7, 64, 96.0]
    text = run_epochs.rows_to_lines(rows)
    assert text.splitlines() == ["zxq, a girl with a red scarf --n lowres, blurry",
                                 f"zxq, {run_epochs.NEW_CONTEXT} --n lowres, blurry --w 64 --h 96 --d 7"]
    assert run_epochs.rows_to_lines(run_epochs.lines_to_rows(text)) == text
    assert run_epochs.rows_to_lines([["", "", None, None, None]]) == ""  # empty rows are skipped


@pytest.mark.parametrize(("row", "message"), [
    (["zxq", "", "x", None, None], "Sample prompt row 1: the seed must be a whole number"),
    (["zxq", "", None, 100, None], "Sample prompt row 1: the width 100 is not a multiple of 8"),
    (["zxq --q 2", "", None, None, None], "Sample prompt row 1: unknown option --q"),
    (["zxq", "", 10**30, None, None], "Sample prompt row 1: the seed 1000000000000000019884624838656 is too large. "
                                      "Use 0 to 4294967295."),  # a training run would crash on it at the first sample
    (["zxq", "", None, 10**9, None], "Sample prompt row 1: the width 1000000000 is too large. Use 0 to 4096."),
    (["zxq --d 99999999999", "", None, None, None], "Sample prompt row 1: --d = 99999999999 is out of range. "
                                                    "Use 0 to 4294967295."),
    (["zxq --h 100000", "", None, None, None], "Sample prompt row 1: --h = 100000 is out of range. Use 8 to 4096."),
])
def test_a_bad_prompt_cell_names_its_row(row, message):
    with pytest.raises(ConfigError, match=message):
        run_epochs.rows_to_lines([row])


def test_the_epoch_list_shows_validation_losses_and_preselects_the_lowest(studio_run):
    studio, _, events = studio_run
    choices, hint = run_epochs.epoch_table(studio, RUN)
    measured = {e.step: e.loss for e in events if isinstance(e, ValidationMeasured)}
    assert [label.split(" (")[0] for label, _ in choices] == ["epoch 1", "epoch 2"]
    assert all(f"validation loss {measured[step]:.4f}" in label for (label, _), step in zip(choices, (2, 4)))
    best = min((2, 4), key=measured.get) // 2
    assert run_epochs.best_choice(studio, RUN).endswith(f"{RUN}-{best:06d}.safetensors")
    assert "only a hint" in hint


def test_use_this_epoch_makes_it_the_output_and_keeps_the_replaced_file(studio_run, tmp_path):
    studio, config, _ = studio_run
    output = Path(config.output.output)
    epoch_one = output.with_name(f"{RUN}-000001.safetensors")
    run_epochs.use_epoch(studio, RUN, str(epoch_one))
    assert output.read_bytes() == epoch_one.read_bytes()
    assert preview_path(output).read_bytes() == preview_path(epoch_one).read_bytes() and json_path(output).is_file()
    assert not output.with_name(f"{RUN}-last.safetensors").exists()  # the old output was epoch 2's twin
    with pytest.raises(StudioError, match="Choose one of the run's epoch files"):
        run_epochs.use_epoch(studio, RUN, str(tmp_path / "other.safetensors"))
    run_epochs.use_epoch(studio, RUN, str(output.with_name(f"{RUN}-000002.safetensors")))  # and back


@pytest.mark.parametrize(("amount", "unit", "epochs", "steps"), [(3, "epochs", 5, 0), (5, "steps", 2, 9)])
def test_continue_for_more_resumes_the_run_longer(studio_run, amount, unit, epochs, steps):
    studio, _, _ = studio_run
    config = run_epochs.continue_config(studio, RUN, amount, unit)
    assert (config.train.epochs, config.train.steps, config.output.resume) == (epochs, steps, "auto")
    with pytest.raises(ConfigError, match="1 or more"):
        run_epochs.continue_config(studio, RUN, 0, unit)
    with pytest.raises(StudioError, match="no checkpoint"):
        run_epochs.continue_config(studio, "nothing", 1, unit)


def test_continue_reads_only_runs_of_the_project(studio_run):
    """A run name with '../' names a run in the runs folder, never a folder elsewhere on the computer."""
    studio, _, _ = studio_run
    elsewhere = studio.projects.runs_dir.parent.parent / f"{RUN}_run"
    shutil.copytree(studio.projects.runs_dir / f"{RUN}_run", elsewhere)
    settings = elsewhere / "config.toml"
    settings.write_text(settings.read_text(encoding="utf-8").replace("epochs = 2\n", "epochs = 50\n"), encoding="utf-8")
    try:
        config = run_epochs.continue_config(studio, f"../../{RUN}", 1, "steps")
        assert config.train.epochs == 2  # the project's run, not the copy beside the project with 50 epochs
        assert Path(config.output.output) == studio.projects.run_output(RUN)
    finally:
        shutil.rmtree(elsewhere)


def test_the_loss_plot_has_the_validation_curve(studio_run):
    _, config, events = studio_run
    run = RunState(id="r", name=RUN, config=config)
    for event in events:
        apply_event(run, event)
    frame = loss_frame(run)
    assert set(frame["curve"]) == {"loss per step", "smoothed", "validation"}
    assert list(frame[frame["curve"] == "validation"]["step"]) == [0, 2, 4]
    assert [path.name for _, path in run.lora_files] == [f"{RUN}-000001.safetensors", f"{RUN}-000002.safetensors"]
    assert run.suggestion == next(e for e in events if isinstance(e, RunFinished)).suggestion
    assert any(isinstance(e, LoraSaved) for e in events)


def test_the_epoch_grid_of_a_run(studio_run):
    from PIL import Image

    studio, _, _ = studio_run
    seen = []
    path = run_epochs.epoch_grid(studio, RUN, "0.5,1", on_progress=seen.append)
    with Image.open(path) as grid:
        width, height = grid.size
    # rows: epoch 1, epoch 2, the final file; columns: one prompt x two weights; cells 64 px
    assert [event.done for event in seen] == [0, 1, 2, 3, 4, 5, 6] and seen[-1].total == 6
    assert width > 2 * 64 and height > 3 * 64 and (width - 2 * 64) < 200 and (height - 3 * 64) < 100


def test_epoch_files_are_offered_in_generate_but_are_not_runs(studio_run):
    from app.run_records import runs_on_disk
    from app.tab_generate import lora_choices

    studio, _, _ = studio_run
    assert [record.name for record in runs_on_disk(studio.projects.runs_dir)] == [RUN]  # one run, not three
    offered = {Path(path).name for _, path in lora_choices(studio)}
    assert {f"{RUN}.safetensors", f"{RUN}-000001.safetensors", f"{RUN}-000002.safetensors"} <= offered


def test_the_prompt_rows_follow_lines_typed_in_the_text_box():
    rows = [["zxq, a girl", "lowres", None, None, None]]
    assert run_epochs.rows_following("zxq, a girl --n lowres", rows) is None  # the rows wrote it: no redraw
    typed = "zxq, a girl --n lowres\nzxq, smiling --w 64 --h 96"
    assert run_epochs.rows_following(typed, rows) == [["zxq, a girl", "lowres", None, None, None],
                                                      ["zxq, smiling", "", None, 64, 96]]
    assert run_epochs.rows_to_lines(run_epochs.rows_following(typed, rows)) == typed  # a row edit keeps both lines
    assert run_epochs.rows_following("zxq, smiling --w", rows) is None  # half-typed: the rows wait
    assert run_epochs.rows_following("", rows) == []
