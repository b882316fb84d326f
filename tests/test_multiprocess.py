"""Data-parallel training with 2 CPU processes (gloo), launched the way the README tells users to.

``accelerate launch --multi_gpu --num_processes 2`` with ACCELERATE_USE_CPU=true (DESIGN §7: a
plain Accelerator() would give two unsynchronised processes, ``--cpu --num_processes 2`` only
one). Each process runs tests/mp_worker.py, which trains through ``trainer.train.loop.train`` and
records what it saw and wrote.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from child_process import child_env
from conftest import write_image_folder
from safetensors.torch import load_file
from tiny_runs import assert_same_lora

from trainer.lora.reading import read_lora_file

pytestmark = pytest.mark.slow

WORKER = Path(__file__).with_name("mp_worker.py")
SETTINGS = dict(rank=4, alpha=2, steps=4, seed=7, min_snr_gamma=0.0, lr=2e-3, lora_dropout=0.1, flip=True,
                shuffle_captions=True, caption_dropout=0.2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(model: Path, data: Path, out: Path, dump: Path, *, stop_after: int = 0, **overrides) -> list[dict]:
    """Run one 2-process training; returns each rank's record (rank order)."""
    settings = {**SETTINGS, "base": str(model), "data": str(data), "output": str(out / "lora.safetensors"), **overrides}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()), str(WORKER),
               "--settings", json.dumps(settings), "--watch", str(out.parent), "--dump", str(dump),
               "--stop-after", str(stop_after)]
    done = subprocess.run(command, env=child_env(ACCELERATE_USE_CPU="true"), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return [json.loads((dump / f"rank-{rank}.json").read_text()) for rank in (0, 1)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("mp") / "data")


@pytest.fixture(scope="module")
def straight_run(tiny_sd1_dir: Path, dataset: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("straight")
    records = launch(tiny_sd1_dir, dataset, root / "out", root / "dump", save_every=2)
    return root, records


def test_two_processes_train_in_lockstep_on_different_samples(straight_run) -> None:
    root, (main, other) = straight_run
    assert main["distributed_type"] == other["distributed_type"] == "DistributedType.MULTI_CPU"
    assert main["num_processes"] == other["num_processes"] == 2

    # gradients are all-reduced: both processes end with bit-identical LoRA weights ...
    a, b = load_file(root / "dump" / "rank-0.safetensors"), load_file(root / "dump" / "rank-1.safetensors")
    assert a.keys() == b.keys() and a
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    assert all(torch.count_nonzero(v) for k, v in a.items() if k.endswith("lora_B")), "training moved every B"

    # ... although each saw different samples: together they cover the epoch once
    seen = [{(epoch, ref[1]) for epoch, refs in record["batches"] for ref in refs} for record in (main, other)]
    assert len(main["batches"]) == len(other["batches"]) == 4
    assert not seen[0] & seen[1]
    images = sorted(ref[0] for record in (main, other) for _, refs in record["batches"] for ref in refs)
    assert images == list(range(8))

    # only the main process wrote files; it wrote the output and checkpoints atomically
    assert other["writes"] == []
    assert other["finished"] is None and main["finished"]["step"] == 4
    renamed_to = [w.split(" ", 1)[1] for w in main["writes"] if w.startswith("os.rename")]
    assert str(root / "out" / "lora.safetensors") in renamed_to
    assert str(root / "out" / "lora_run" / "checkpoints" / "step-000002") in renamed_to
    assert not any(w.startswith("open ") and w.endswith("lora.safetensors") for w in main["writes"]), \
        "the output is written under a temporary name, then renamed"

    # the LoRA is a valid SD1 kohya file holding the weights both processes agree on
    lora = read_lora_file(root / "out" / "lora.safetensors")
    assert lora.family is None or lora.family == "sd1"
    assert lora.style == "kohya" and lora.modules


def test_two_process_resume_continues_every_process_exactly(straight_run, tiny_sd1_dir: Path, dataset: Path,
                                                           tmp_path: Path) -> None:
    """Would fail if a checkpoint kept only the main process's noise generator (the other process
    would resume on the main's random stream and the weights would drift from the straight run)."""
    straight_root, _ = straight_run
    first = launch(tiny_sd1_dir, dataset, tmp_path / "out", tmp_path / "dump1", stop_after=1)
    # a stop asked after step 1 travels as a vote with step 2's loss: both processes stop after step 2
    assert first[0]["finished"]["step"] == 2 and first[0]["finished"]["stopped_early"]
    resumed = launch(tiny_sd1_dir, dataset, tmp_path / "out", tmp_path / "dump2", resume="auto")
    assert resumed[0]["finished"]["step"] == 4
    assert [len(r["batches"]) for r in resumed] == [2, 2], "each process resumed at its own data position"

    assert_same_lora(straight_root / "out" / "lora.safetensors", tmp_path / "out" / "lora.safetensors")
