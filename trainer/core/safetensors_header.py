"""The header of a .safetensors file, read and checked before any tensor is allocated.

A safetensors file is 8 bytes of header length, a JSON header (tensor name -> dtype, shape and
byte range; optional ``__metadata__`` of strings) and the tensor bytes. Everything a loader would
trip over is checked here so the user gets a sentence, not a crash: a truncated file, a header
that is not JSON, byte ranges that do not match their shapes, overlap, leave gaps or run past the
end (the format forbids all three), and pickles renamed to .safetensors (refused: loading a
pickle can run code). Errors are of the caller's kind (``LoraFileError`` for LoRA files).
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

from trainer.core.errors import StudioError

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
MAX_HEADER_BYTES = 100 * 1024 * 1024
ITEMSIZE = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8, "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
            "F8_E8M0": 1, "I16": 2, "U16": 2, "I32": 4, "U32": 4, "I64": 8, "U64": 8}
CONVERT_HINT = ("Use the .safetensors version of this file, or convert it once on a machine you trust: "
                "load it with torch.load(path, weights_only=True) and save the tensors with "
                "safetensors.torch.save_file.")


def read_safetensors_header(path: Path, error: type[StudioError] = StudioError) -> tuple[dict, dict[str, str]]:
    """Validated tensor entries and ``__metadata__`` of a safetensors file (reads the header only).

    Problems raise ``error`` (the caller's kind of ``StudioError``) naming the file and what is wrong.
    """
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(9)
        if not (len(head) == 9 and head[8:9] == b"{") and _looks_like_pickle(head):
            refuse_pickle(path, error)
        if len(head) < 8:
            raise corrupt_file_error(path, error, f"it is only {size} bytes long", truncated=True)
        (header_len,) = struct.unpack("<Q", head[:8])
        # The claimed length is the file's own first 8 bytes: never quoted (for a file that is not a
        # safetensors file at all, e.g. /etc/passwd, that number spells out its first characters).
        if header_len > MAX_HEADER_BYTES:
            raise corrupt_file_error(path, error, "its first 8 bytes claim a header over the 100 MB limit "
                                     "(it does not start like a .safetensors file)")
        if 8 + header_len > size:
            raise corrupt_file_error(path, error, f"its first 8 bytes claim a header longer than the whole file "
                                     f"({size:,} bytes)", truncated=True)
        fh.seek(8)
        raw_header = fh.read(header_len)
    try:
        header = json.loads(raw_header.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise corrupt_file_error(path, error, "its header is not valid JSON") from None
    if not isinstance(header, dict):
        raise corrupt_file_error(path, error, "its header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise corrupt_file_error(path, error, "its __metadata__ is not a table of strings")
    _check_offsets(path, header, size - 8 - header_len, error)
    return header, metadata


def load_safetensors(path: Path, error: type[StudioError] = StudioError) -> tuple[dict[str, Any], dict[str, str]]:
    """(tensors, metadata) of a safetensors file, its header checked first (``read_safetensors_header``).

    Every path that opens a LoRA, a checkpoint or a cache reads through here, so a broken file
    (overlapping or out-of-range byte ranges, a huge header, a pickle) gets one clear message.
    """
    import safetensors
    import safetensors.torch

    _, metadata = read_safetensors_header(path, error)
    try:
        return safetensors.torch.load_file(str(path)), metadata
    except (safetensors.SafetensorError, OSError, RuntimeError) as exc:
        raise error(f"{path.name} could not be read as safetensors ({type(exc).__name__}).",
                    hint="The file is damaged; download or export it again.") from None


def _check_offsets(path: Path, header: dict, data_len: int, error: type[StudioError]) -> None:
    spans = []
    for name, info in header.items():
        if not (isinstance(info, dict) and isinstance(info.get("dtype"), str) and isinstance(info.get("shape"), list)
                and isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2):
            raise corrupt_file_error(path, error, f"the header entry of '{name}' is malformed")
        dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in ITEMSIZE:
            raise corrupt_file_error(path, error, f"'{name}' has the unknown dtype {dtype}")
        if not all(isinstance(d, int) and d >= 0 for d in (*shape, begin, end)) or begin > end:
            raise corrupt_file_error(path, error, f"'{name}' has an invalid shape or byte range")
        if end > data_len:
            raise corrupt_file_error(path, error, f"'{name}' needs bytes up to {end:,} but only {data_len:,} follow the header",
                           truncated=True)
        if end - begin != math.prod(shape) * ITEMSIZE[dtype]:
            raise corrupt_file_error(path, error, f"'{name}' has {end - begin} bytes for shape {shape} of {dtype}")
        spans.append((begin, end))
    position = 0
    for begin, end in sorted(spans):
        if begin < position:
            raise corrupt_file_error(path, error, "the byte ranges of its tensors overlap (the format forbids it: "
                                     "one tensor's bytes would be read as another's)")
        if begin > position:
            raise corrupt_file_error(path, error, "its tensors leave gaps between their byte ranges")
        position = end
    if position != data_len:
        raise corrupt_file_error(path, error, f"{data_len - position:,} unexpected bytes follow the last tensor")


def _looks_like_pickle(head: bytes) -> bool:
    zip_archive = head.startswith(b"PK\x03\x04")  # torch.save's default container
    raw_pickle = len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5
    return zip_archive or raw_pickle


def refuse_pickle(path: Path, error: type[StudioError]) -> None:
    raise error(
        f"{path.name} is a pickle (PyTorch .ckpt/.pt/.bin) file; loading a pickle can run any code hidden "
        "inside it, so LoRA Studio only reads .safetensors.", hint=CONVERT_HINT)


def corrupt_file_error(path: Path, error: type[StudioError], what: str, truncated: bool = False) -> StudioError:
    hint = ("The file looks truncated (an incomplete download or copy?); download or export it again."
            if truncated else "It is not a valid .safetensors file, or it is damaged; download or export it again.")
    return error(f"{path.name} cannot be read: {what}.", hint=hint)
