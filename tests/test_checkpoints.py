"""Checkpoints: pickle-free round trip, atomic folders, rotation, damage reported clearly."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.core.atomic import atomic_write_bytes
from trainer.core.errors import CheckpointError, StudioError
from trainer.train.checkpoints import list_checkpoints, load_checkpoint, save_checkpoint


def _optimizer_state():
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    return opt.state_dict()


def test_nested_state_round_trips_without_pickle(tmp_path: Path, monkeypatch):
    def no_torch_load(*args, **kwargs):
        raise AssertionError("checkpoints must never be unpickled")

    monkeypatch.setattr(torch, "load", no_torch_load)
    state = {
        "optimizer": _optimizer_state(),  # int keys, tuples (betas), tensors
        "python_rng": random.getstate(),
        "numpy_rng": np.random.get_state(),
        "generator": torch.Generator().manual_seed(3).get_state(),
        "loss_ema": None,
        "nested": {"a": [1, 2.5, "x", (True, None)]},
    }
    path = save_checkpoint(tmp_path, 7, state, keep_last=3)
    step, loaded = load_checkpoint(path)
    assert step == 7
    assert loaded["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)
    for key, moments in state["optimizer"]["state"].items():
        assert torch.equal(loaded["optimizer"]["state"][key]["exp_avg"], moments["exp_avg"])
    assert loaded["python_rng"] == state["python_rng"]
    np.random.set_state(loaded["numpy_rng"])
    assert np.array_equal(np.random.get_state()[1], state["numpy_rng"][1])
    assert torch.equal(loaded["generator"], state["generator"])
    assert loaded["nested"] == {"a": [1, 2.5, "x", (True, None)]}
    torch.optim.AdamW(torch.nn.Linear(4, 3).parameters()).load_state_dict(loaded["optimizer"])


def test_rotation_keeps_the_last_k_and_ignores_partial_folders(tmp_path: Path):
    for step in (10, 20, 30, 40):
        save_checkpoint(tmp_path, step, {"x": torch.ones(1) * step}, keep_last=2)
    (tmp_path / ".step-000050.abc").mkdir()  # a crash while staging leaves this behind
    (tmp_path / "step-000060").mkdir()  # a folder without files is not a checkpoint
    assert [c.step for c in list_checkpoints(tmp_path)] == [30, 40]


def test_damaged_checkpoint_is_reported(tmp_path: Path):
    path = save_checkpoint(tmp_path, 1, {"x": torch.ones(3)}, keep_last=1)
    (path / "tensors.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="damaged"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="not a LoRA Studio checkpoint"):
        load_checkpoint(tmp_path / "missing")


def test_atomic_write_keeps_old_file_when_writing_fails(tmp_path: Path, monkeypatch):
    target = tmp_path / "lora.safetensors"
    atomic_write_bytes(target, b"old")

    def disk_full(self, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", disk_full)
    with pytest.raises(StudioError, match="disk is full"):
        atomic_write_bytes(target, b"new")
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["lora.safetensors"]  # no temp file left behind
