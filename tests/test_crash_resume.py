"""Nothing the user made is lost: kill -9 at any moment, a full disk, a crash in the middle of a save.

The training runs here are real ``lora-studio train`` processes (``python -m trainer.cli``),
killed with SIGKILL, so no Python cleanup code gets a chance to run: what survives is exactly
what was on disk. The reference is the same seeded run left alone.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors
import torch
from child_process import child_env
from conftest import write_image_folder
from tiny_runs import assert_same_lora

from trainer.core.errors import StudioError
from trainer.lora.reading import read_lora_file
from trainer.train.checkpoints import list_checkpoints, load_checkpoint

STEPS, SAVE_EVERY = 64, 4  # >= 52 steps remain after the latest kill point: the kill lands mid-run even on a fast, quiet machine
TRAIN_FLAGS = ["--preset", "character", "--rank", "4", "--alpha", "2", "--steps", str(STEPS),
               "--save-every", str(SAVE_EVERY), "--keep-last", "2", "--seed", "7", "--lr", "2e-3",
               "--min-snr-gamma", "0", "--flip", "--shuffle-captions", "--caption-dropout", "0.2",
               "--lora-dropout", "0.1"]

# Runs the CLI with one function wrapped so that the process SIGKILLs itself at a chosen moment.
KILL_WRAPPER = r"""
import os, signal, sys
from pathlib import Path
where = sys.argv.pop(1)
if where.startswith("checkpoint:"):
    import trainer.train.checkpoints as ck
    save_file, step = ck.save_file, where.split(":")[1]
    def save_then_die(tensors, path, *a, **kw):
        save_file(tensors, path, *a, **kw)
        if f"step-{int(step):06d}" in path:  # tensors written, state.json not yet, folder not renamed
            os.kill(os.getpid(), signal.SIGKILL)
    ck.save_file = save_then_die
elif where == "export":
    import trainer.core.atomic as atomic
    fsync = atomic._fsync_file
    def fsync_then_die(path):
        fsync(path)
        if Path(path).name.startswith(".lora.safetensors."):  # complete temp file, not yet renamed
            os.kill(os.getpid(), signal.SIGKILL)
    atomic._fsync_file = fsync_then_die
from trainer.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def _env() -> dict[str, str]:
    return child_env(PYTHONUNBUFFERED="1")


def _train_command(model: Path, data: Path, out: Path, *extra: str, kill_where: str | None = None) -> list[str]:
    program = ["-c", KILL_WRAPPER, kill_where] if kill_where else ["-m", "trainer.cli"]
    return [sys.executable, *program, "train", "--base", str(model), "--data", str(data),
            "--output", str(out / "lora.safetensors"), *TRAIN_FLAGS, *extra]


def _run(command: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, env={**_env(), **env}, capture_output=True, text=True, timeout=600)


def _assert_visible_checkpoints_complete(folder: Path) -> None:
    """Every step-NNNNNN folder visible right now holds both files (a folder deleted meanwhile is fine)."""
    if not folder.is_dir():
        return
    for child in folder.iterdir():
        if child.name.startswith("step-"):
            complete = (child / "state.json").is_file() and (child / "tensors.safetensors").is_file()
            assert complete or not child.exists(), f"partial checkpoint visible under its final name: {child}"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("crash") / "data")


@pytest.fixture(scope="module")
def straight_lora(tiny_sd1_dir: Path, dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted seeded run every interrupted one must end up equal to."""
    out = tmp_path_factory.mktemp("straight")
    done = _run(_train_command(tiny_sd1_dir, dataset, out))
    assert done.returncode == 0, done.stderr[-3000:]
    return out / "lora.safetensors"


@pytest.mark.slow
def test_kill_9_at_a_random_step_then_resume_matches_the_uninterrupted_run(tiny_sd1_dir: Path, dataset: Path,
                                                                          straight_lora: Path, tmp_path: Path):
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    kill_after, delay = rng.choice([4, 8, 12]), rng.uniform(0.0, 0.4)
    context = f"(seed {seed}: kill {delay:.2f} s after checkpoint {kill_after})"
    out = tmp_path / "out"
    checkpoints, output = out / "lora_run" / "checkpoints", out / "lora.safetensors"
    with open(tmp_path / "log.txt", "w") as log:
        proc = subprocess.Popen(_train_command(tiny_sd1_dir, dataset, out), env=_env(), stdout=log, stderr=log)
        try:
            deadline = time.monotonic() + 300
            while not (checkpoints / f"step-{kill_after:06d}").is_dir():
                assert proc.poll() is None, f"training ended before the kill {context}: " + \
                    (tmp_path / "log.txt").read_text()[-2000:]
                assert time.monotonic() < deadline, context
                _assert_visible_checkpoints_complete(checkpoints)
                time.sleep(0.002)
            until = time.monotonic() + delay
            while time.monotonic() < until:
                _assert_visible_checkpoints_complete(checkpoints)
                time.sleep(0.002)
            assert proc.poll() is None, f"training finished before the kill {context}"
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL

    # what survived: only complete checkpoints under checkpoint names, no output yet
    _assert_visible_checkpoints_complete(checkpoints)
    survived = list_checkpoints(checkpoints)
    assert survived and survived[-1].step >= kill_after, context
    for info in survived:
        assert load_checkpoint(info.path)[0] == info.step
    assert not output.exists(), context

    resumed = _run(_train_command(tiny_sd1_dir, dataset, out, "--resume", "auto"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resuming from the checkpoint of step {survived[-1].step}." in resumed.stdout, context
    assert f"done at step {STEPS}" in resumed.stdout
    assert_same_lora(straight_lora, output)
    assert not list(checkpoints.glob(".step-*")), "leftovers of the killed save are cleaned up"


@pytest.mark.slow
def test_kill_9_inside_a_checkpoint_save_and_inside_the_export(tiny_sd1_dir: Path, dataset: Path,
                                                               straight_lora: Path, tmp_path: Path):
    out = tmp_path / "out"
    checkpoints, output = out / "lora_run" / "checkpoints", out / "lora.safetensors"

    # 1. killed while writing the checkpoint of step 8: its folder never appears, step 4 is intact
    killed = _run(_train_command(tiny_sd1_dir, dataset, out, kill_where="checkpoint:8"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert [c.step for c in list_checkpoints(checkpoints)] == [4]
    assert not (checkpoints / "step-000008").exists()
    assert len(list(checkpoints.glob(".step-000008.*"))) == 1  # the abandoned staging folder, hidden
    assert not output.exists()

    # 2. resumed from step 4, killed after writing the whole LoRA to its temporary name
    killed = _run(_train_command(tiny_sd1_dir, dataset, out, "--resume", "auto", kill_where="export"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert "Resuming from the checkpoint of step 4." in killed.stdout
    assert not output.exists(), "the export is only visible once complete"
    assert len(list(out.glob(".lora.safetensors.*.tmp"))) == 1
    assert [c.step for c in list_checkpoints(checkpoints)] == [STEPS - SAVE_EVERY, STEPS]  # keep_last=2
    assert not list(checkpoints.glob(".step-*")), "the next save cleaned up the abandoned staging folder"

    # 3. resumed at the end: nothing left to train, the export is written again
    resumed = _run(_train_command(tiny_sd1_dir, dataset, out, "--resume", "auto"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resuming from the checkpoint of step {STEPS}." in resumed.stdout
    read_lora_file(output)
    assert_same_lora(straight_lora, output)


def _fail_when_writing(marker: str):
    """A safetensors.torch.save_file that fails like a full disk when the target path contains ``marker``."""
    from safetensors.torch import save_file

    def save(tensors, path, *args, **kwargs):
        if marker in str(path):
            Path(path).write_bytes(b"\0" * 100)  # a partly written file, as a real full disk leaves it
            raise safetensors.SafetensorError(
                "Error while serializing: I/O error: No space left on device (os error 28)")
        return save_file(tensors, path, *args, **kwargs)
    return save


def test_disk_full_while_saving_a_checkpoint_keeps_the_previous_one(tiny_sd1_dir: Path, dataset: Path,
                                                                   tmp_path: Path, monkeypatch, capsys):
    import trainer.train.checkpoints as ck
    from trainer.cli.main import main

    monkeypatch.setattr(ck, "save_file", _fail_when_writing("step-000004"))
    out = tmp_path / "out"
    argv = ["train", "--base", str(tiny_sd1_dir), "--data", str(dataset), "--output", str(out / "lora.safetensors"),
            "--rank", "4", "--steps", "6", "--save-every", "2", "--seed", "7"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: Could not write the checkpoint") and "the disk is full" in err[-1]
    assert "earlier checkpoints were kept" in err[-1] and "Traceback" not in "\n".join(err)
    checkpoints = out / "lora_run" / "checkpoints"
    assert [p.name for p in checkpoints.iterdir()] == ["step-000002"]  # no staging or partial folder left
    assert load_checkpoint(checkpoints / "step-000002")[0] == 2

    # with space again, the run resumes from the kept checkpoint
    monkeypatch.undo()
    assert main([*argv, "--resume", "auto"]) == 0
    assert "Resuming from the checkpoint of step 2." in capsys.readouterr().out


def test_disk_full_while_exporting_keeps_the_previous_lora(tmp_path: Path, monkeypatch):
    import trainer.lora.writing as formats
    from trainer.lora.reading import LoraModule

    modules = [LoraModule("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k",
                          torch.randn(4, 768), torch.randn(320, 4), 4.0)]
    target = tmp_path / "lora.safetensors"
    formats.save_kohya_lora(modules, {}, target)
    before = target.read_bytes()
    monkeypatch.setattr(formats.safetensors.torch, "save_file", _fail_when_writing(".lora.safetensors."))
    with pytest.raises(StudioError, match="disk is full") as caught:
        formats.save_kohya_lora(modules, {}, target)
    assert "previous file was kept" in str(caught.value)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["lora.safetensors"]


def _mount_tiny_tmpfs(where: Path) -> bool:
    where.mkdir()
    if os.geteuid() != 0:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(where)], capture_output=True)
    return done.returncode == 0


def test_a_really_full_disk_gives_the_same_clear_errors(tmp_path: Path):
    """The real thing where the test may mount a 64 kB tmpfs (root): safetensors reports ENOSPC as
    its own SafetensorError, which must still become the disk-full message, not a traceback."""
    from trainer.lora.reading import LoraModule
    from trainer.lora.writing import save_kohya_lora
    from trainer.train.checkpoints import save_checkpoint

    small = tmp_path / "small"
    if not _mount_tiny_tmpfs(small):
        pytest.skip("cannot mount a tmpfs here (needs root); the monkeypatched tests cover the logic")
    try:
        save_checkpoint(small, 1, {"x": torch.ones(4)}, keep_last=2)
        with pytest.raises(StudioError, match="the disk is full"):
            save_checkpoint(small, 2, {"x": torch.ones(100_000)}, keep_last=2)
        assert [c.step for c in list_checkpoints(small)] == [1]
        assert sorted(p.name for p in small.iterdir()) == ["step-000001"]
        big = [LoraModule("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k",
                          torch.randn(64, 768), torch.randn(320, 64), 4.0)]
        with pytest.raises(StudioError, match="disk is full"):
            save_kohya_lora(big, {}, small / "lora.safetensors")
        assert sorted(p.name for p in small.iterdir()) == ["step-000001"]
    finally:
        subprocess.run(["umount", str(small)], check=False)


CAPTION_WRITER = r"""
import sys
from pathlib import Path
from trainer.core.atomic import atomic_write_text
path = Path(sys.argv[1])
print("ready", flush=True)
i = 0
while True:
    atomic_write_text(path, ("A" if i % 2 else "B") * 200_000)
    i += 1
"""


def test_captions_written_atomically_survive_kill_9(tmp_path: Path):
    """The Dataset tab saves captions with atomic_write_text: a reader sees the old or the new text, whole."""
    caption = tmp_path / "img.txt"
    caption.write_text("A" * 200_000)
    proc = subprocess.Popen([sys.executable, "-c", CAPTION_WRITER, str(caption)], env=_env(),
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        seen = set()
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            text = caption.read_text()
            assert re.fullmatch(r"A{200000}|B{200000}", text), f"partial caption of {len(text)} characters"
            seen.add(text[0])
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        proc.kill()
        proc.wait()
    assert seen == {"A", "B"}, "the writer was running while we read"
    assert re.fullmatch(r"A{200000}|B{200000}", caption.read_text())
