"""Which device and precision a command runs on, checked before any model is loaded.

A device name is ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``. ``check_device_name`` reads
only the text (the config's validation uses it); ``resolve_device`` also asks torch whether that
device is here, and ``check_training_precision`` whether the precision runs on it. Each refusal
names the setting and the fix, instead of the dtype mismatch or ``AssertionError`` that torch
raises deep inside the first forward pass.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from trainer.core.errors import ConfigError

if TYPE_CHECKING:
    import torch

DEVICE_NAMES = "auto, cpu, cuda, cuda:N (N = the GPU's number, from 0) or mps"
_DEVICE = re.compile(r"(auto|cpu|mps|cuda)(:\d+)?")


def check_device_name(wanted: str, label: str = "--device") -> str:
    """The normalised name (``"CUDA:0 "`` -> ``"cuda:0"``); a ConfigError for anything else."""
    name = str(wanted).strip().lower()
    match = _DEVICE.fullmatch(name)
    if match is None or (match.group(2) and match.group(1) != "cuda"):
        raise ConfigError(f"{_setting(label, wanted)} is not a device.", hint=f"Use {DEVICE_NAMES}.")
    return name


def resolve_device(wanted: str | None, label: str = "--device") -> torch.device:
    """The torch device for ``wanted`` (None or "auto": the first CUDA GPU when there is one, else the CPU)."""
    import torch

    name = check_device_name(wanted or "auto", label)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"{_setting(label, name)}: there is no CUDA device here (this PyTorch sees no NVIDIA GPU).",
                              hint=f"Use {_flag(label)} cpu, or auto (a GPU when there is one).")
        index = int(name.partition(":")[2] or 0)
        if index >= count:
            raise ConfigError(f"{_setting(label, name)}: there is no CUDA device {index}; this machine has {count} "
                              f"(cuda:0{f' to cuda:{count - 1}' if count > 1 else ''}).",
                              hint=f"Use {_flag(label)} cuda:0{f' to cuda:{count - 1}' if count > 1 else ''} or cpu.")
        return torch.device("cuda", index)
    if name == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ConfigError(f"{_setting(label, 'mps')}: there is no Apple-silicon (MPS) device here.",
                          hint=f"Use {_flag(label)} cpu, or auto.")
    return torch.device(name)


def check_training_precision(precision: str, device: torch.device, label: str = "--precision") -> None:
    """fp16 training needs a GPU (on the CPU the half weights meet fp32 activations); bf16 needs one that has it."""
    import torch

    if precision == "fp16" and device.type == "cpu":
        raise ConfigError(f"{_setting(label, 'fp16')} does not run on the CPU.",
                          hint=f"Use {_flag(label)} fp32 (or bf16, or auto) on the CPU; fp16 is for CUDA GPUs.")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"{_setting(label, 'bf16')}: {torch.cuda.get_device_name(device)} has no bfloat16 support.",
                          hint=f"Use {_flag(label)} fp16 (or auto) on this GPU.")


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA raises torch.OutOfMemoryError; the CPU and MPS allocators raise a plain RuntimeError."""
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(
        words in text for words in ("out of memory", "not enough memory", "can't allocate memory"))


def _setting(label: str, value: str) -> str:
    """How the message names the value: ``--device cuda:7`` for a flag, ``train.device = 'cuda:7'`` for a setting."""
    return f"{label} {value}" if label.startswith("--") else f"{label} = {value!r}"


def _flag(label: str) -> str:
    """``train.device`` -> ``--device``: the flag (and the app's setting of that name) a user changes."""
    return label if label.startswith("--") else "--" + label.rpartition(".")[2].replace("_", "-")
