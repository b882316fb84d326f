"""Resumable training checkpoints, written atomically and read without pickle.

A checkpoint is a folder ``step-000120/`` holding
  - ``tensors.safetensors``: LoRA weights, optimiser moments, RNG states (all tensors),
  - ``state.json``: everything else (counters, scheduler state, Python/NumPy RNG, the
    fingerprints that must match to resume), with ``{"__tensor__": key}`` placeholders.
Nested optimiser/scheduler state dicts are flattened into those two files generically, so no
object is ever unpickled (``torch.load`` is never called). The folder is assembled under a
temporary name and renamed into place: a crash leaves either the previous checkpoints or the
complete new one, never a half-written folder under a checkpoint name.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from trainer.core.atomic import is_disk_full
from trainer.core.errors import CheckpointError, StudioError
from trainer.core.safetensors_header import load_safetensors

_NAME = re.compile(r"^step-(\d{6,})$")
TENSORS_FILE = "tensors.safetensors"
STATE_FILE = "state.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class CheckpointInfo:
    step: int
    path: Path


def flatten_state(obj: Any, tensors: dict[str, torch.Tensor], prefix: str = "s") -> Any:
    """JSON-able copy of ``obj`` with every tensor moved into ``tensors`` under a unique key."""
    if isinstance(obj, torch.Tensor):
        key = f"{prefix}"
        tensors[key] = obj.detach().to("cpu").contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        tensors[prefix] = torch.from_numpy(np.ascontiguousarray(obj).copy())
        return {"__ndarray__": prefix}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: flatten_state(v, tensors, f"{prefix}.{k}") for k, v in obj.items()}
        return {"__items__": [[k, flatten_state(v, tensors, f"{prefix}.{i}")] for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, tuple):
        return {"__tuple__": [flatten_state(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [flatten_state(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint a value of type {type(obj).__name__} at {prefix}")


def unflatten_state(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of ``flatten_state``."""
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__ndarray__" in obj:
            return tensors[obj["__ndarray__"]].numpy()
        if "__items__" in obj:
            return {k: unflatten_state(v, tensors) for k, v in obj["__items__"]}
        if "__tuple__" in obj:
            return tuple(unflatten_state(v, tensors) for v in obj["__tuple__"])
        return {k: unflatten_state(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [unflatten_state(v, tensors) for v in obj]
    return obj


def save_checkpoint(checkpoint_dir: Path, step: int, state: dict[str, Any], keep_last: int) -> Path:
    """Write ``state`` as ``checkpoint_dir/step-NNNNNN`` atomically, then drop old checkpoints."""
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    final = checkpoint_dir / f"step-{step:06d}"
    tensors: dict[str, torch.Tensor] = {}
    document = {"format": FORMAT_VERSION, "step": step, "state": flatten_state(state, tensors)}
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=checkpoint_dir))
    try:
        save_file(tensors, str(staging / TENSORS_FILE))
        (staging / STATE_FILE).write_text(json.dumps(document), encoding="utf-8")
        for name in (TENSORS_FILE, STATE_FILE):
            with open(staging / name, "rb+") as fh:
                os.fsync(fh.fileno())
        if final.exists():  # "save now" twice at the same step: replace the older copy
            _discard(final)
        os.replace(staging, final)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, OSError) or is_disk_full(exc):  # safetensors reports a full disk as SafetensorError
            reason = "the disk is full" if is_disk_full(exc) else (getattr(exc, "strerror", None) or exc)
            raise StudioError(f"Could not write the checkpoint {final}: {reason}.",
                              hint="Free disk space or choose another output folder; earlier checkpoints were kept.") from None
        raise
    for old in list_checkpoints(checkpoint_dir)[:-keep_last]:
        _discard(old.path)
    for stray in checkpoint_dir.glob(".step-*"):  # left behind by a crash in the middle of a save or delete
        shutil.rmtree(stray, ignore_errors=True)
    return final


def _discard(path: Path) -> None:
    """Delete a checkpoint folder; renamed first, so a crash never leaves half of one under its name."""
    doomed = path.with_name(f".{path.name}.{secrets.token_hex(4)}.deleting")
    try:
        os.replace(path, doomed)
    except OSError:
        doomed = path
    shutil.rmtree(doomed, ignore_errors=True)


def list_checkpoints(checkpoint_dir: Path) -> list[CheckpointInfo]:
    """Complete checkpoints, oldest first (staging folders and strays are ignored)."""
    if not checkpoint_dir.is_dir():
        return []
    found = []
    for child in checkpoint_dir.iterdir():
        match = _NAME.match(child.name)
        if match and (child / STATE_FILE).is_file() and (child / TENSORS_FILE).is_file():
            found.append(CheckpointInfo(int(match.group(1)), child))
    return sorted(found, key=lambda c: c.step)


def load_checkpoint(path: Path) -> tuple[int, dict[str, Any]]:
    """(step, state) of a checkpoint folder; a damaged one gives a CheckpointError."""
    try:
        document = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
        tensors, _ = load_safetensors(path / TENSORS_FILE, CheckpointError)
    except CheckpointError as exc:
        raise CheckpointError(f"The checkpoint {path} is damaged: {exc.message}",
                              hint="Delete it and resume from an earlier one.") from None
    except FileNotFoundError:
        inside = list_checkpoints(path) or list_checkpoints(path / "checkpoints")  # a run or checkpoints folder
        raise CheckpointError(f"{path} is not a LoRA Studio checkpoint (no {STATE_FILE}/{TENSORS_FILE}).",
                              hint=f"It holds checkpoints: use --resume {inside[-1].path} (the latest), or --resume auto."
                              if inside else "Point --resume at a step-NNNNNN folder, or use --resume auto.") from None
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
        raise damaged(path, exc) from None
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise damaged(path, exc) from None
    if not isinstance(document, dict):
        raise damaged(path, f"{STATE_FILE} holds a {type(document).__name__}, not an object")
    if document.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"The checkpoint {path} was written by another version of LoRA Studio.",
                              hint="Start a new run.")
    step, state = document.get("step"), document.get("state")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise damaged(path, f"its step is {step!r}, not a step number")
    if not isinstance(state, dict):
        raise damaged(path, "its training state is missing")
    try:
        return step, unflatten_state(state, tensors)
    except (KeyError, TypeError, ValueError) as exc:  # a mangled key: a tensor reference that leads nowhere
        raise damaged(path, f"{type(exc).__name__}: {exc}") from None


def damaged(path: Path, reason: object) -> CheckpointError:
    """The one message for a checkpoint that cannot be read back, whatever is wrong inside it."""
    return CheckpointError(f"The checkpoint {path} is damaged ({reason}).",
                           hint="Delete it and resume from an earlier one (or start again without --resume).")
