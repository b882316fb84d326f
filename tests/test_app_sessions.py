"""Two browser sessions on one app: one trains while the other generates.

Two gradio_client Clients are two sessions (each its own session hash, as two browser tabs).
The server runs in this process on 127.0.0.1 with the tiny demo model, so the engine's
``Generator.generate`` can be wrapped to record when each generation ran.

What a user would notice: a run and a generation both finish; the page state of one session
(``gr.State``: the gallery's infotexts, the run watcher's token) never shows up in the other;
two generations never run at once (gradio's "gpu" queue); and on a GPU a generation waits,
with a message saying why, while a training run uses that GPU (on the CPU both go ahead).
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import gradio as gr
import pytest
from browser.app_server import write_pictures
from conftest import make_pattern_image
from gradio_client import Client

from app.launch import free_port
from app.projects import DEMO_MODEL_CHOICE, DEMO_MODEL_DIR
from app.studio import Studio
from app.ui import launch
from trainer.generate.generator import Generator
from trainer.train.events import RunFinished, RunStarted, StepProgress

DEMO = DEMO_MODEL_CHOICE
DATASET = "sessions-set"
RUN = {"steps": 30, "rank": 4, "alpha": 4, "resolution": 64, "sample_every": 0, "save_every": 0, "trigger": "zxq"}


def generate_args(seed: int) -> tuple:
    """/generate inputs: demo model, no LoRA, one 2-step image."""
    return DEMO, [], "zxq, a portrait", "", seed, 2, 5.0, 0, 0, "Euler a", 1, False


def session(url: str) -> Client:
    """One browser session, as a script sees it (file outputs as paths on the server)."""
    return Client(url, verbose=False, download_files=False)


@contextmanager
def serve(root: Path, demo_model: Path, first_port: int, train_fn=None) -> Iterator[tuple[Studio, gr.Blocks, str]]:
    shutil.copytree(demo_model, root / "models" / DEMO_MODEL_DIR)
    studio = Studio.create(root, train_fn=train_fn)
    write_pictures(studio.projects.dataset_dir(DATASET, create=True), 4, make_pattern_image)
    demo, url = launch(studio, host="127.0.0.1", port=free_port("127.0.0.1", first_port), block=False, quiet=True)
    try:
        yield studio, demo, url.rstrip("/")
    finally:
        studio.close()
        demo.close()


@pytest.fixture
def generations(monkeypatch: pytest.MonkeyPatch) -> list[tuple[float, float]]:
    """(start, end) of every ``Generator.generate`` call; each lasts at least 0.3 s so an overlap would show."""
    spans: list[tuple[float, float]] = []
    real = Generator.generate

    def recorded(self, *args, **kwargs):
        start = time.monotonic()
        try:
            time.sleep(0.3)
            return real(self, *args, **kwargs)
        finally:
            spans.append((start, time.monotonic()))

    monkeypatch.setattr(Generator, "generate", recorded)
    return spans


def session_states(demo: gr.Blocks, client: Client) -> dict[str, object]:
    """This session's gr.State values on the server, by what they hold (infotexts list, watcher token)."""
    session = demo.state_holder[client.session_hash]
    values = {}
    for block in demo.blocks.values():
        if isinstance(block, gr.State) and block._id in session.state_data:
            values["watch_token" if isinstance(block.value, dict) else "infotexts"] = session[block._id]
    return values


def test_one_session_trains_while_another_generates(tmp_path: Path, tiny_sd1_dir: Path,
                                                    generations: list[tuple[float, float]]) -> None:
    with serve(tmp_path, tiny_sd1_dir, 7930) as (studio, demo, url):
        trainer, artist = session(url), session(url)
        assert trainer.session_hash != artist.session_hash

        run_id, _, _ = trainer.predict(DATASET, DEMO, "character-lite", "sessions-run", RUN,
                                       api_name="/start_training")
        watching = trainer.submit(run_id, api_name="/watch_run")  # streams until the run ends
        run = studio.runs.get(run_id)
        deadline = time.monotonic() + 60
        while run.status != "training":
            assert time.monotonic() < deadline and run.active, (run.status, run.error)
            run = studio.runs.wait_for_change(run_id, run.version, 5)

        gallery, infotext, notes = artist.predict(*generate_args(11), api_name="/generate")
        assert studio.runs.get(run_id).step < RUN["steps"], "the run ended before the generation: raise its steps"
        progress, status, *_ = watching.result(timeout=120)

        # both finished: the run with its LoRA, the generation with its image, and on the CPU side by side
        assert 'data-status="finished"' in progress, status
        assert (studio.projects.runs_dir / "sessions-run.safetensors").is_file()
        assert len(gallery) == 1 and Path(gallery[0]["image"]["path"]).is_file()
        assert "Seed: 11" in infotext and "Made 1 image" in notes and "Waited" not in notes
        assert len(generations) == 1

        # per-session state stays in its session
        trainer_state, artist_state = session_states(demo, trainer), session_states(demo, artist)
        assert artist_state.get("infotexts") == [infotext]
        assert trainer_state.get("infotexts", []) == []
        assert trainer_state["watch_token"]["n"] >= 1  # the trainer's page watched its run
        assert artist_state.get("watch_token", {"n": 0}) == {"n": 0}
        defaults = [b.value for b in demo.blocks.values() if isinstance(b, gr.State)]
        assert {"n": 0} in defaults and [] in defaults  # each session mutates its own copy, never the default

        # two sessions generating at once take turns on the "gpu" queue
        first, second = (client.submit(*generate_args(seed), api_name="/generate")
                         for client, seed in ((trainer, 21), (artist, 22)))
        (_, text_a, _), (_, text_b, _) = first.result(timeout=60), second.result(timeout=60)
        assert "Seed: 21" in text_a and "Seed: 22" in text_b
        spans = sorted(generations[1:])
        assert len(spans) == 2 and spans[0][1] <= spans[1][0], f"two generations overlapped: {spans}"
        assert session_states(demo, trainer)["infotexts"] == [text_a]
        assert session_states(demo, artist)["infotexts"] == [text_b]


def test_on_a_gpu_generation_waits_for_the_training_run_and_says_so(tmp_path: Path, tiny_sd1_dir: Path,
                                                                    generations: list[tuple[float, float]],
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A run on cuda:0 (an engine stand-in) and a generator that would go to the same GPU."""
    release, ended = threading.Event(), []

    def train_on_gpu(config, commands):
        yield RunStarted(2, 0, 4, 1, tmp_path / "gpu-run_run", "cuda:0", 1)
        release.wait(30)
        yield StepProgress(1, 2, 0, 0.5, 0.5, 1e-4, 1.0, 1.0)
        ended.append(time.monotonic())
        yield RunFinished(2, tmp_path / "gpu-run.safetensors", 0, False)

    monkeypatch.setattr(Studio, "generation_device", lambda self: "cuda")
    with serve(tmp_path, tiny_sd1_dir, 7940, train_on_gpu) as (studio, _demo, url):
        trainer, artist = session(url), session(url)
        run_id, _, _ = trainer.predict(DATASET, DEMO, "character-lite", "gpu-run", RUN, api_name="/start_training")
        run = studio.runs.get(run_id)
        while run.status != "training":
            assert run.active, (run.status, run.error)
            run = studio.runs.wait_for_change(run_id, run.version, 5)

        job = artist.submit(*generate_args(5), api_name="/generate")
        deadline, told = time.monotonic() + 30, ""
        while not told:
            assert time.monotonic() < deadline, "the generation never said it was waiting"
            progress = job.status().progress_data or []
            told = next((p.desc for p in progress if p.desc and "Waiting for the training run" in p.desc), "")
            time.sleep(0.1)
        assert "'gpu-run'" in told and "Stop the run" in told
        assert not job.done() and not generations  # nothing loaded beside the run

        release.set()
        _, infotext, notes = job.result(timeout=60)
        assert "Seed: 5" in infotext and "Waited for the training run to finish first" in notes
        assert generations[0][0] >= ended[0]  # it started only after the run's last step
        assert studio.runs.get(run_id).status == "finished"
