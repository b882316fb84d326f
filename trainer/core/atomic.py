"""Crash-safe file writes: temp file in the same folder, fsync, rename.

A reader never sees a half-written file under its final name: either the old file or the
complete new one. Used for LoRA exports, checkpoints, captions and configs.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from trainer.core.errors import StudioError


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``final``; on success it is fsynced and renamed over it."""
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    except OSError as exc:
        raise write_error(final, exc) from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) or is_disk_full(exc):
            raise write_error(final, exc) from None
        raise


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC/EDQUOT, also when a library reports it as its own error type (safetensors raises
    ``SafetensorError("... No space left on device (os error 28)")``, not OSError)."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(exc)
    return "No space left on device" in text or f"(os error {errno.ENOSPC})" in text


def write_error(final: Path, exc: BaseException) -> StudioError:
    """The user-facing error for a failed write of ``final`` (disk full, read-only, no permission)."""
    if is_disk_full(exc):
        return StudioError(f"The disk is full while writing {final}.",
                           hint="Free some space; the previous file was kept unchanged.")
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return StudioError(f"Could not write {final}: {reason}.",
                       hint="Check that the folder is writable (permissions, a read-only or disconnected drive); "
                            "the previous file was kept unchanged.")


def atomic_write_bytes(final: Path, data: bytes) -> None:
    with atomic_path(final) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(final: Path, text: str) -> None:
    atomic_write_bytes(final, text.encode("utf-8"))


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    if os.name != "posix":  # Windows cannot open directories; rename is already durable there
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
