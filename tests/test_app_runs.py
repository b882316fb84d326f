"""The run controller: queued runs run one after another, Stop reaches the engine, failures are kept.

A scripted stand-in for ``trainer.train.loop.train`` yields the engine's real event types, so these
tests check the controller's bookkeeping in milliseconds; the real loop runs in the API and
browser tests.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.run_records import RECORD_FILE, resume_config, runs_on_disk
from app.runs import RunController, RunState, apply_event, save_record
from trainer.config.presets import resolve_config
from trainer.config.schema import StudioConfig, save_toml
from trainer.core.errors import StudioError, TrainingError
from trainer.train.events import (
    CheckpointSaved,
    Event,
    Notice,
    RunCommands,
    RunFinished,
    RunStarted,
    SamplesMade,
    StepProgress,
)

TIMEOUT = 10.0


def make_config(tmp_path: Path, name: str) -> StudioConfig:
    return resolve_config(None, None, {"output": str(tmp_path / "runs" / f"{name}.safetensors"), "steps": 5})


class ScriptedEngine:
    """Runs ``steps`` steps per run; each step waits for ``gate`` so tests control the pace."""

    def __init__(self, steps: int = 5, fail_with: Exception | None = None) -> None:
        self.steps = steps
        self.fail_with = fail_with
        self.gate = threading.Semaphore(0)
        self.started: list[str] = []
        self.free_running = False

    def __call__(self, config: StudioConfig, commands: RunCommands) -> Iterator[Event]:
        output = Path(config.output.output)
        self.started.append(output.stem)
        run_dir = output.parent / f"{output.stem}_run"
        yield Notice("info", "Preparing latents and text embeddings…")
        if self.fail_with is not None:
            raise self.fail_with
        yield RunStarted(self.steps, 0, 4, 1, run_dir, "cpu", 1000)
        step = 0
        while step < self.steps:  # like the real loop: a step in flight finishes, then Stop is seen
            if not self.free_running:
                assert self.gate.acquire(timeout=TIMEOUT), "test never released the step"
            step += 1
            yield StepProgress(step, self.steps, 0, 1.0 / step, 1.0 / step, 1e-4, 2.0, (self.steps - step) / 2.0)
            if commands.take_save_request():
                yield CheckpointSaved(step, run_dir / "checkpoints" / f"step-{step:06d}")
            if commands.stop_requested:
                break
        yield CheckpointSaved(step, run_dir / "checkpoints" / f"step-{step:06d}")
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_bytes(b"lora")
        yield RunFinished(step, output, 4, stopped_early=step < self.steps)


def wait_for(controller: RunController, run_id: str, condition, timeout: float = TIMEOUT) -> RunState:
    deadline = time.monotonic() + timeout
    run = controller.get(run_id)
    while not condition(run):
        assert time.monotonic() < deadline, f"run stuck in {run.status} at step {run.step}"
        run = controller.wait_for_change(run_id, run.version, 0.5)
    return run


def test_queued_runs_execute_one_after_another(tmp_path: Path) -> None:
    engine = ScriptedEngine(steps=2)
    controller = RunController(engine)
    first = controller.submit("first", make_config(tmp_path, "first"))
    second = controller.submit("second", make_config(tmp_path, "second"))
    wait_for(controller, first.id, lambda r: r.status == "training")
    assert controller.get(second.id).status == "queued"
    assert controller.active_run().id == first.id
    for _ in range(2):
        engine.gate.release()
    done = wait_for(controller, first.id, lambda r: not r.active)
    assert done.status == "finished" and done.step == 2 and done.output.name == "first.safetensors"
    wait_for(controller, second.id, lambda r: r.status == "training")
    for _ in range(2):
        engine.gate.release()
    wait_for(controller, second.id, lambda r: r.status == "finished")
    assert engine.started == ["first", "second"]
    controller.shutdown()


def test_progress_is_folded_into_the_state(tmp_path: Path) -> None:
    engine = ScriptedEngine(steps=3)
    engine.free_running = True
    controller = RunController(engine)
    run = controller.submit("r", make_config(tmp_path, "r"))
    final = wait_for(controller, run.id, lambda r: not r.active)
    assert [step for step, _, _ in final.losses] == [1, 2, 3]
    assert final.total_steps == 3 and final.eta_s == 0.0 and final.num_images == 4
    assert final.notices == ["Preparing latents and text embeddings…"]
    assert final.checkpoints[-1][0] == 3
    assert (final.run_dir / RECORD_FILE).is_file()
    controller.shutdown()


def test_stop_goes_through_the_engine_and_leaves_a_stopped_run(tmp_path: Path) -> None:
    engine = ScriptedEngine(steps=50)
    controller = RunController(engine)
    run = controller.submit("long", make_config(tmp_path, "long"))
    engine.gate.release()
    wait_for(controller, run.id, lambda r: r.step == 1)
    assert controller.stop(run.id).status == "stopping"
    engine.gate.release()  # lets a step in flight finish; the loop then sees the flag
    final = wait_for(controller, run.id, lambda r: not r.active)
    assert final.status == "stopped" and final.step in (1, 2) and final.checkpoints[-1][0] == final.step
    assert final.output.is_file()
    controller.shutdown()


def test_stopping_a_queued_run_cancels_it_without_running(tmp_path: Path) -> None:
    engine = ScriptedEngine(steps=1)
    controller = RunController(engine)
    first = controller.submit("first", make_config(tmp_path, "first"))
    second = controller.submit("second", make_config(tmp_path, "second"))
    assert controller.stop(second.id).status == "cancelled"
    engine.gate.release()
    wait_for(controller, first.id, lambda r: not r.active)
    assert engine.started == ["first"]
    controller.shutdown()


def test_save_and_sample_now_need_a_training_run(tmp_path: Path) -> None:
    engine = ScriptedEngine(steps=3)
    controller = RunController(engine)
    run = controller.submit("r", make_config(tmp_path, "r"))
    wait_for(controller, run.id, lambda r: r.status == "training")
    controller.save_now(run.id)
    assert "A checkpoint will be saved after the current step." in controller.sample_now(run.id).notices
    engine.gate.release()
    state = wait_for(controller, run.id, lambda r: r.step == 1 and r.checkpoints)
    assert state.checkpoints == [(1, state.run_dir / "checkpoints" / "step-000001")]
    assert "A checkpoint will be saved after the current step." not in state.notices  # done: no longer promised
    engine.gate.release()
    engine.gate.release()
    final = wait_for(controller, run.id, lambda r: not r.active)
    assert not [n for n in final.notices if "after the current step" in n]  # nothing promised under a finished run
    with pytest.raises(StudioError, match="not training"):
        controller.save_now(run.id)
    with pytest.raises(StudioError, match="not training"):
        controller.sample_now(run.id)
    with pytest.raises(StudioError, match="No run with id"):
        controller.get("nope")
    controller.shutdown()


@pytest.mark.parametrize("error, expected", [
    (TrainingError("The loss became nan at step 3.", hint="Lower the learning rate."),
     "The loss became nan at step 3. Lower the learning rate."),
    (RuntimeError("boom"), "internal error (RuntimeError: boom)"),
])
def test_a_failing_run_keeps_its_message_and_the_queue_goes_on(tmp_path: Path, error: Exception,
                                                               expected: str) -> None:
    failing = ScriptedEngine(fail_with=error)
    controller = RunController(failing)
    bad = controller.submit("bad", make_config(tmp_path, "bad"))
    state = wait_for(controller, bad.id, lambda r: not r.active)
    assert state.status == "failed" and expected in state.error
    failing.fail_with = None
    failing.free_running = True
    good = controller.submit("good", make_config(tmp_path, "good"))
    assert wait_for(controller, good.id, lambda r: not r.active).status == "finished"
    controller.shutdown()


def test_the_same_output_cannot_be_queued_twice(tmp_path: Path) -> None:
    engine = ScriptedEngine()
    controller = RunController(engine)
    run = controller.submit("r", make_config(tmp_path, "r"))
    with pytest.raises(StudioError, match="already queued or training"):
        controller.submit("r", make_config(tmp_path, "r"))
    engine.free_running = True
    engine.gate.release()
    wait_for(controller, run.id, lambda r: not r.active)
    controller.shutdown()


def test_runs_on_disk_and_resume_config(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    config = make_config(tmp_path, "old")
    run_dir = runs / "old_run"
    (run_dir / "checkpoints" / "step-000003").mkdir(parents=True)
    save_toml(config, run_dir / "config.toml")
    state = RunState(id="x", name="old", config=config, status="stopped", step=3, total_steps=5)

    save_record(state)
    from trainer.train import checkpoints

    checkpoints.save_checkpoint(run_dir / "checkpoints", 3, {"step": 3}, keep_last=2)
    records = runs_on_disk(runs)
    assert [(r.name, r.status, r.step, r.total_steps, r.last_checkpoint, r.resumable) for r in records] == [
        ("old", "stopped", 3, 5, 3, True)]
    resumed = resume_config(runs, "old")
    assert resumed.output.resume == "auto" and resumed.train.steps == 5
    with pytest.raises(StudioError, match="no saved settings"):
        resume_config(runs, "missing")


def test_apply_event_keeps_samples_newest_last_and_marks_early_stop(tmp_path: Path) -> None:
    run = RunState(id="x", name="r", config=make_config(tmp_path, "r"))
    apply_event(run, RunStarted(10, 4, 3, 1, tmp_path, "cpu", 10))
    apply_event(run, SamplesMade(5, (tmp_path / "a.png",), ("zxq",)))
    apply_event(run, Notice("warning", "img.png is small"))
    apply_event(run, RunFinished(6, tmp_path / "r.safetensors", 123, stopped_early=True))
    assert run.start_step == 4 and run.notices == ["⚠ img.png is small"]
    assert run.samples == [(tmp_path / "a.png", "step 5: zxq")]
    assert run.status == "stopped" and run.size_bytes == 123


def test_a_run_cut_off_by_a_closed_app_is_listed_as_interrupted_and_resumable(tmp_path: Path) -> None:
    from app.run_view import resumable_runs, runs_table
    from app.studio import Studio
    from trainer.train import checkpoints

    studio = Studio.create(tmp_path / "projects", train_fn=ScriptedEngine())
    config = make_config(tmp_path / "projects", "cut")
    state = RunState(id="x", name="cut", config=config, status="training", step=7, total_steps=20)

    save_record(state)  # what the earlier session last wrote before it died
    checkpoints.save_checkpoint(state.run_dir / "checkpoints", 6, {"step": 6}, keep_last=2)
    assert runs_table(studio) == [["cut", "⚠ interrupted", "7 / 20", "step 6", ""]]
    assert resumable_runs(studio) == ["cut"]
