"""Where a command may write: a file of the kind it writes, not a folder, and none of its own inputs.

Every writer is atomic (``trainer.core.atomic``): the finished file is renamed over whatever has
that name. An artist who types the input's name as ``--out`` (or the base checkpoint's name as the
LoRA's output) would lose the input without a word, and a LoRA saved as ``name.png`` or
``name.ckpt`` is a file no tool opens as what it is. Checked before any work starts.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from trainer.core.errors import ConfigError


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether two paths name one file (also through a symlink, a hard link or ``..``)."""
    a, b = Path(a).expanduser(), Path(b).expanduser()
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet): compare the names
        return a.resolve() == b.resolve()


def is_inside(path: str | Path, folder: str | Path) -> bool:
    """Whether ``path`` lies in ``folder`` or below it (names resolved; either may not exist yet)."""
    return Path(folder).expanduser().resolve() in Path(path).expanduser().resolve().parents


def check_output_file(out: str | Path, *, suffix: str, label: str,
                      inputs: Iterable[tuple[str, str | Path | None]] = ()) -> Path:
    """``out`` as a Path, if it is a ``suffix`` file other than every ``(what, path)`` of ``inputs``.

    ``label`` names the output in the message ("--out", "The checkpoint"); ``what`` names an input
    ("LoRA file", "base model").
    """
    out = Path(out).expanduser()
    if out.is_dir():
        raise ConfigError(f"{label} {out} is a folder.", hint=f"Name the file to write, e.g. {out / ('name' + suffix)}.")
    if out.suffix.lower() != suffix:
        raise ConfigError(f"{label} must be a {suffix} file, not {out.name}.",
                          hint=f"Name it with the {suffix} extension, e.g. {out.with_name(out.stem + suffix).name}.")
    for what, path in inputs:
        if path and same_file(out, path):
            raise ConfigError(f"{label} {out} is the {what} it reads; writing there would replace that file.",
                              hint="Choose a new name for the output.")
    return out


def check_output_folder(folder: str | Path, *, label: str) -> Path:
    """``folder`` as a Path, if it is a folder or can become one (no file stands at it or above it)."""
    folder = Path(folder).expanduser()
    for place in (folder, *folder.parents):
        if not place.exists():
            continue
        if place.is_dir():
            break
        problem = "is a file, not a folder" if place == folder else f"cannot be made: {place} is a file"
        raise ConfigError(f"{label} {folder} {problem}.",
                          hint="Give a folder (it is made if missing); the pictures get numbered names inside it.")
    return folder
