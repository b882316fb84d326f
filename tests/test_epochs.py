"""Choosing the epoch: epoch LoRA files, kohya prompt lines, the validation loss, metrics, the hint, parity.

One shared 3-epoch run on the tiny SD1 model (8 pictures, 2 held out, batch 3 = 2 steps an epoch)
serves most tests; the resume test makes its own two runs.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import safetensors.torch
import torch
from conftest import write_image_folder
from PIL import Image
from tiny_runs import run_events

from trainer.config.presets import resolve_config
from trainer.core.errors import ConfigError
from trainer.generate.prompt_file import (
    SamplePrompt,
    parse_prompt_line,
    parse_prompt_lines,
    sample_prompt_list,
)
from trainer.lora.sidecars import json_path, preview_path
from trainer.train.epoch_files import epoch_file, list_saved_loras
from trainer.train.events import (
    LoraSaved,
    Notice,
    RunFinished,
    ValidationMeasured,
)
from trainer.train.metrics import read_metrics

PROMPTS = ["zxq, portrait --d 5 --n blurry", "zxq reading a book --w 64 --h 96 --l 5 --s 3"]


def _config(model: Path, data: Path, out: Path, **overrides):
    settings = {"base": str(model), "data": str(data), "output": str(out / "zxq.safetensors"), "rank": 4, "alpha": 2,
                "epochs": 3, "seed": 7, "batch_size": 3, "lr": 3e-3, "min_snr_gamma": 0.0, "save_lora_every": 1,
                "validation_split": 0.25, "sample_steps": 2, "trigger": "zxq", "sample_prompts": PROMPTS}
    return resolve_config("character", overrides={**settings, **overrides})


@pytest.fixture(scope="module")
def three_epochs(tiny_sd1_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("epochs")
    data = write_image_folder(root / "data")
    config = _config(tiny_sd1_dir, data, root / "out")
    return config, run_events(config)


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(path))


def _header(path: Path) -> dict[str, str]:
    raw = path.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + length])["__metadata__"]


# --- epoch files --------------------------------------------------------------------------------


def test_a_three_epoch_run_leaves_three_loadable_epoch_files_and_the_final(three_epochs, tiny_sd1_dir):
    from tiny_runs import load_pipeline

    config, events = three_epochs
    final = Path(config.output.output)
    saved = [e for e in events if isinstance(e, LoraSaved)]
    assert [(e.epoch, e.step, e.path.name) for e in saved] == [
        (1, 2, "zxq-000001.safetensors"), (2, 4, "zxq-000002.safetensors"), (3, 6, "zxq-000003.safetensors")]
    assert [s.epoch for s in list_saved_loras(final)] == [1, 2, 3]  # the final file is not an epoch file
    files = [e.path for e in saved]
    weights = [_tensors(p) for p in files]
    final_weights = _tensors(final)
    assert all(w.keys() == final_weights.keys() for w in weights)  # same key layout
    assert all(v.dtype == torch.float16 for w in weights for k, v in w.items() if k.endswith(".weight"))
    for a, b in ((0, 1), (1, 2)):
        assert any(not torch.equal(weights[a][k], weights[b][k]) for k in final_weights), f"epochs {a + 1}, {b + 1} equal"
    assert all(torch.equal(weights[2][k], final_weights[k]) for k in final_weights), "the last epoch is the final file"
    for path, (epoch, step) in zip(files, ((1, 2), (2, 4), (3, 6))):
        meta = _header(path)
        assert (meta["ss_epoch"], meta["ss_steps"], meta["ss_output_name"]) == (str(epoch), str(step), "zxq")
        raw = path.read_bytes()
        assert meta["sshs_model_hash"] == hashlib.sha256(raw[8 + int.from_bytes(raw[:8], "little"):]).hexdigest()
        assert json_path(path).is_file() and preview_path(path).is_file()  # A1111 sidecars, like the final file
        sample = config.output.output.replace("zxq.safetensors", f"zxq_run/samples/step-{step:06d}-0.png")
        assert preview_path(path).read_bytes() == Path(sample).read_bytes()  # the preview is that epoch's sample
    for path in files:
        pipe = load_pipeline(tiny_sd1_dir)
        pipe.load_lora_weights(str(path), adapter_name="epoch")
        assert "epoch" in pipe.get_list_adapters()["unet"]


def test_every_epoch_has_a_sample_per_prompt_with_the_prompt_lines_settings(three_epochs):
    config, _ = three_epochs
    samples = Path(config.output.output).parent / "zxq_run" / "samples"
    names = sorted(p.name for p in samples.iterdir())
    assert names == [f"step-{s:06d}-{i}.png" for s in (2, 4, 6) for i in (0, 1)]
    sizes = {name: Image.open(samples / name).size for name in names}
    assert {sizes[f"step-000002-{i}.png"] for i in (0, 1)} == {(64, 64), (64, 96)}  # --w 64 --h 96 on line 2


def test_keep_lora_last_bounds_the_files_and_resume_keeps_the_numbering(tiny_sd1_dir, tmp_path):
    data = write_image_folder(tmp_path / "data")
    common = {"keep_lora_last": 2, "save_every": 2, "validation_split": 0.0, "sample_prompts": PROMPTS[:1]}
    straight = run_events(_config(tiny_sd1_dir, data, tmp_path / "a", epochs=4, **common))
    assert [p.name for p in (s.path for s in list_saved_loras(tmp_path / "a" / "zxq.safetensors"))] == [
        "zxq-000003.safetensors", "zxq-000004.safetensors"]
    assert [r.name for e in straight if isinstance(e, LoraSaved) for r in e.removed] == [
        "zxq-000001.safetensors", "zxq-000002.safetensors"]
    assert not json_path(tmp_path / "a" / "zxq-000001.safetensors").exists()  # sidecars go with their file

    killed = run_events(_config(tiny_sd1_dir, data, tmp_path / "b", epochs=4, **common), stop_after=3)
    assert killed[-1].step == 3
    assert [s.epoch for s in list_saved_loras(tmp_path / "b" / "zxq.safetensors")] == [1]  # 3 steps an epoch
    resumed = run_events(_config(tiny_sd1_dir, data, tmp_path / "b", epochs=4, resume="auto", **common))
    assert [(e.epoch, e.path.name) for e in resumed if isinstance(e, LoraSaved)] == [
        (2, "zxq-000002.safetensors"), (3, "zxq-000003.safetensors"), (4, "zxq-000004.safetensors")]
    assert [s.epoch for s in list_saved_loras(tmp_path / "b" / "zxq.safetensors")] == [3, 4]
    for epoch in (3, 4):
        a, b = _tensors(epoch_file(tmp_path / "a" / "zxq.safetensors", epoch)), _tensors(
            epoch_file(tmp_path / "b" / "zxq.safetensors", epoch))
        assert all(torch.equal(a[k], b[k]) for k in a), f"epoch {epoch} differs after resume"
    steps = [row["step"] for row in read_metrics(tmp_path / "b" / "zxq_run") if "loss" in row]
    assert steps == list(range(1, 13))  # the resumed run's metrics continue, without the killed steps twice


# --- prompt lines --------------------------------------------------------------------------------


@pytest.mark.parametrize(("line", "want"), [
    ("a zxq girl reading", SamplePrompt("a zxq girl reading")),
    ("a zxq girl reading --n blurry, lowres --w 512 --h 768 --d 42 --l 7.5 --s 28",
     SamplePrompt("a zxq girl reading", "blurry, lowres", 512, 768, 42, 7.5, 28)),
    ("zxq --s 10 --n bad hands", SamplePrompt("zxq", negative="bad hands", steps=10)),
    ("zxq, 1girl --ss euler_a --d 0", SamplePrompt("zxq, 1girl", seed=0, sampler="Euler a")),
    ("zxq --ss DPM++ 2M Karras", SamplePrompt("zxq", sampler="DPM++ 2M Karras")),
    ("a well-lit room--like place", SamplePrompt("a well-lit room--like place")),  # no space before --: text
])
def test_kohya_prompt_lines(line, want):
    assert parse_prompt_line(line) == want
    assert parse_prompt_line(want.text()) == want  # the GUI's rows write lines back in the same syntax


@pytest.mark.parametrize(("line", "message"), [
    ("zxq --x 3", "prompts.txt line 2: unknown option --x"),
    ("zxq --w 500", "prompts.txt line 2: --w = 500 is not a multiple of 8"),
    ("zxq --d minus", "prompts.txt line 2: --d needs a whole number, got 'minus'"),
    ("zxq --l -1", "prompts.txt line 2: --l = -1 is out of range"),
    ("zxq --s", "prompts.txt line 2: --s needs a value"),
    ("--n blurry", "prompts.txt line 2: the line has options but no prompt"),
    ("zxq --ss Warp 9", "prompts.txt line 2: --ss: Unknown sampler"),
])
def test_bad_prompt_lines_name_the_line(line, message):
    with pytest.raises(ConfigError) as error:
        parse_prompt_lines(["# a comment", line], "prompts.txt")
    assert str(error.value).startswith(message)


def test_a_prompt_file_is_read_line_by_line(tmp_path):
    file = tmp_path / "prompts.txt"
    file.write_text("# epoch test\nzxq, portrait --d 1\n\nzxq on the moon --w 128\n", encoding="utf-8")
    assert sample_prompt_list([str(file)]) == [SamplePrompt("zxq, portrait", seed=1), SamplePrompt("zxq on the moon", width=128)]
    with pytest.raises(ConfigError, match="Prompt file not found"):
        sample_prompt_list([str(tmp_path / "missing.txt")])


def test_a_bad_prompt_line_stops_the_run_before_training(tiny_sd1_dir, tmp_path):
    data = write_image_folder(tmp_path / "data")
    with pytest.raises(ConfigError, match="sample prompt 2: unknown option --q"):
        run_events(_config(tiny_sd1_dir, data, tmp_path / "out", sample_prompts=["zxq", "zxq --q 1"]))
    with pytest.raises(ConfigError, match="Unknown sampler"):
        run_events(_config(tiny_sd1_dir, data, tmp_path / "out", sampler="Warp 9"))


# --- validation ----------------------------------------------------------------------------------


def test_the_validation_loss_is_deterministic_and_held_out_pictures_never_train(tiny_sd1_dir, tmp_path):
    from trainer.lora import inject
    from trainer.train.session import open_session
    from trainer.train.validation import ValidationSet

    data = write_image_folder(tmp_path / "data")
    session = open_session(_config(tiny_sd1_dir, data, tmp_path / "out"), lambda level, text: None)
    held = {item.sha256 for item in session.validation_scan.items}
    assert len(held) == 2 and len(session.training_set.items) == 6
    trained = {session.training_set.items[ref.index].sha256
               for epoch in range(5) for batch in session.training_set.epoch_batches(epoch, 3, 7) for ref in batch}
    assert trained and not trained & held
    again = open_session(_config(tiny_sd1_dir, data, tmp_path / "out2"), lambda level, text: None)
    assert {item.sha256 for item in again.validation_scan.items} == held  # the same seed holds out the same pictures
    other = open_session(_config(tiny_sd1_dir, data, tmp_path / "out3", seed=8), lambda level, text: None)
    assert {item.sha256 for item in other.validation_scan.items} != held

    validation = ValidationSet(session)
    first, second = validation.loss(session), validation.loss(session)
    assert first == second and first > 0  # fixed timesteps and noise: the same weights, the same number
    for module in session.trainable_models().values():
        for tensor in inject.lora_state(module).values():
            tensor.data.add_(0.05)  # other weights, another number
    assert validation.loss(session) != first


def test_metrics_file_curves_and_the_best_epoch_hint(three_epochs):
    config, events = three_epochs
    measured = [e for e in events if isinstance(e, ValidationMeasured)]
    assert [(e.step, e.epoch) for e in measured] == [(0, 0), (2, 1), (4, 2), (6, 3)]
    rows = read_metrics(Path(config.output.output).parent / "zxq_run")
    assert [row["step"] for row in rows if "loss" in row] == [1, 2, 3, 4, 5, 6]
    assert [row["val_loss"] for row in rows if "val_loss" in row] == [e.loss for e in measured]
    assert all({"epoch", "lr"} <= row.keys() for row in rows)
    finished = events[-1]
    assert isinstance(finished, RunFinished)
    best = min(measured[1:], key=lambda e: e.loss)
    assert f"epoch {best.epoch} (zxq-{best.epoch:06d}.safetensors" in finished.suggestion
    assert "only a hint" in finished.suggestion
    assert any(isinstance(e, Notice) and e.text == finished.suggestion for e in events)


@pytest.mark.parametrize(("settings", "message"), [
    ({"validation_split": 1.0}, "data.validation_split = 1.0 is out of range"),
    ({"validation_split": 0.1, "validation_data": "held"}, "either validation_split or validation_data"),
    ({"save_lora_every": -1}, "output.save_lora_every = -1 is out of range"),
    ({"log_with": "wandb"}, "output.log_with = 'wandb' is out of range"),
])
def test_bad_epoch_settings_are_config_errors(settings, message):
    with pytest.raises(ConfigError, match=message):
        resolve_config("character", overrides=settings)


def test_validation_data_folder_and_a_split_that_leaves_nothing(tiny_sd1_dir, tmp_path):
    from trainer.core.errors import DatasetError
    from trainer.train.session import open_session

    data = write_image_folder(tmp_path / "data")
    held = write_image_folder(tmp_path / "held")
    session = open_session(_config(tiny_sd1_dir, data, tmp_path / "o", validation_split=0.0, validation_data=str(held)),
                           lambda level, text: None)
    assert len(session.training_set.items) == 8 and session.validation_scan.root == held
    one = tmp_path / "one"
    one.mkdir()
    for name in ("img00.png", "img00.txt"):
        (one / name).write_bytes((data / name).read_bytes())
    with pytest.raises(DatasetError, match="would hold out all 1 usable pictures"):
        open_session(_config(tiny_sd1_dir, one, tmp_path / "p", validation_split=0.5), lambda level, text: None)


def test_fingerprint_of_a_run_without_the_new_settings_is_unchanged(tiny_sd1_dir, tmp_path):
    """Held-out pictures are new settings: off, a run keeps the identity the earlier release gave it."""
    from dataclasses import replace

    from trainer.train.fingerprint import legacy_fingerprint, run_fingerprint
    from trainer.train.session import open_session

    data = write_image_folder(tmp_path / "data")
    session = open_session(_config(tiny_sd1_dir, data, tmp_path / "o", validation_split=0.0), lambda level, text: None)
    assert session.legacy_fingerprint is not None  # checkpoints of the earlier scheme still resume
    assert session.legacy_fingerprint == legacy_fingerprint(session.config, session.training_set)
    held_out = replace(session.config, data=replace(session.config.data, validation_split=0.25))
    assert legacy_fingerprint(held_out, session.training_set) is None  # no earlier checkpoint held pictures out
    assert run_fingerprint(held_out, session.training_set, session.base_hash) != session.fingerprint


# --- parity of the written file ------------------------------------------------------------------


def test_the_parity_check_passes_the_written_file_and_catches_a_corrupted_one(three_epochs, tmp_path):
    from trainer.generate.prompt_file import parse_prompt_line
    from trainer.train.parity import image_difference, render_from_file

    config, events = three_epochs
    assert events[-1].parity_warning == ""  # the run's own check passed
    final = Path(config.output.output)
    prompt = parse_prompt_line(PROMPTS[0]).with_defaults(seed=0, width=64, height=64, cfg=7.5, steps=2, sampler="DPM++ 2M")
    sample = Image.open(final.parent / "zxq_run" / "samples" / "step-000006-0.png").convert("RGB")
    good = image_difference(sample, render_from_file(config.model.base, "", final, prompt, 1, "cpu", "fp32"))
    assert good.ok and good.warning(final) == ""
    tensors = _tensors(final)
    broken = tmp_path / "broken.safetensors"
    safetensors.torch.save_file({k: v * 40 if k.endswith("lora_up.weight") else v for k, v in tensors.items()},
                                str(broken), metadata=_header(final))
    bad = image_difference(sample, render_from_file(config.model.base, "", broken, prompt, 1, "cpu", "fp32"))
    assert good.difference < 0.5 and not bad.ok
    assert "renders differently from the in-training sample" in bad.warning(broken)


# --- the epoch grid ------------------------------------------------------------------------------


def test_the_grid_has_a_labelled_cell_per_file_prompt_and_weight(three_epochs, tmp_path):
    from trainer.generate.generator import Generator
    from trainer.generate.grid import grid_files, render_grid

    config, _ = three_epochs
    out = Path(config.output.output).parent
    files = grid_files([str(out / "zxq*.safetensors")])
    assert [f.name for f in files] == ["zxq-000001.safetensors", "zxq-000002.safetensors", "zxq-000003.safetensors",
                                       "zxq.safetensors"]  # epochs in order, the final file last
    prompts = [parse_prompt_line(line).with_defaults(seed=9, width=64, height=64, cfg=7.0, steps=2, sampler="Euler")
               for line in ("zxq, portrait", "zxq on the moon --w 32")]
    progress = []
    grid = render_grid(Generator.from_base(config.model.base, precision="fp32", device="cpu"), files[::3], prompts,
                       [0.5, 1.0], on_progress=progress.append)
    assert grid.row_labels == ("zxq-000001", "zxq")
    assert grid.column_labels == ("zxq, portrait @ 0.5", "zxq, portrait @ 1", "zxq on the moon @ 0.5", "zxq on the moon @ 1")
    assert [p.done for p in progress] == list(range(9)) and progress[-1].total == 8
    left, top = grid.origin
    assert grid.cell_size == (64, 64) and grid.image.size == (left + 4 * 64, top + 2 * 64)
    cells = [[grid.image.crop((left + c * 64, top + r * 64, left + c * 64 + 32, top + r * 64 + 64)) for c in range(4)]
             for r in range(2)]
    assert cells[0][1].tobytes() != cells[1][1].tobytes()  # rows differ by the file only
    margin = grid.image.crop((0, top, left, top + 64)).convert("L")
    assert margin.getextrema()[0] < 128  # a row label is drawn


def test_grid_command_writes_the_picture_and_refuses_a_pattern_without_files(three_epochs, tmp_path, capsys):
    from trainer.cli.main import main

    config, _ = three_epochs
    out = Path(config.output.output).parent
    picture = tmp_path / "grid.png"
    code = main(["grid", "--base", config.model.base, "--lora", str(out / "zxq-00000[13].safetensors"), "--prompt",
                 "zxq --d 3", "--steps", "1", "--device", "cpu", "--out", str(picture)])
    assert code == 0 and "2 rows x 1 columns" in capsys.readouterr().out
    assert Image.open(picture).size[1] > 2 * 64
    assert main(["grid", "--base", config.model.base, "--lora", str(out / "nope-*.safetensors"), "--prompt", "zxq",
                 "--out", str(picture)]) == 2
    assert "No LoRA file matches" in capsys.readouterr().err


# --- TensorBoard ---------------------------------------------------------------------------------


def test_tensorboard_logs_through_accelerates_tracker_or_names_the_missing_package(tmp_path, monkeypatch):
    import importlib.util

    from trainer.train.metrics import log_images, open_tracker

    assert open_tracker("", tmp_path) is None
    if importlib.util.find_spec("tensorboard") is not None:
        tracker = open_tracker("tensorboard", tmp_path / "logs")
        tracker.log({"val_loss": 0.5}, step=3)
        log_images(tracker, 3, {"sample_0": Image.new("RGB", (16, 24), "red"), "sample_1": Image.new("RGB", (8, 8))})
        tracker.finish()
        assert list((tmp_path / "logs" / "lora-studio").glob("events.out.tfevents.*"))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    with pytest.raises(ConfigError, match=r"needs the tensorboard package.*lora-studio\[tensorboard\]"):
        open_tracker("tensorboard", tmp_path / "logs")


def test_the_train_command_reports_epoch_files_validation_and_the_hint(tiny_sd1_dir, tmp_path, capsys):
    from trainer.cli.main import main

    data = write_image_folder(tmp_path / "data")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("zxq, portrait --d 4\n", encoding="utf-8")
    code = main(["train", "--base", str(tiny_sd1_dir), "--data", str(data), "--output", str(tmp_path / "o" / "zxq.safetensors"),
                 "--rank", "2", "--alpha", "1", "--epochs", "2", "--batch-size", "3", "--save-lora-every", "1",
                 "--validation-split", "0.25", "--sample-prompts", str(prompts), "--sample-steps", "1"])
    out = capsys.readouterr().out
    assert code == 0
    assert "epoch 1 LoRA (step 2): " in out and "epoch 2 LoRA (step 4): " in out
    assert "validation loss at step 4 (epoch 2): " in out and "Lowest validation loss: epoch" in out
    assert (tmp_path / "o" / "zxq_run" / "samples" / "step-000002-0.png").is_file()
