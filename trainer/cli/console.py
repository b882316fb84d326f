"""What the terminal sees: exit codes, an argument parser that reads negative numbers, quiet libraries.

Shared by every ``lora-studio`` sub-command (``trainer.cli.train``, ``trainer.cli.tools``) and by
the app's launcher (``app.cli``), so all of them exit and print alike.
"""

from __future__ import annotations

import argparse
import re
from typing import Any

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


class StudioArgumentParser(argparse.ArgumentParser):
    """argparse that takes any negative number as a value: ``--lr -1e-4``, ``--cfg -.5``, ``--seed -1``.

    Python < 3.14 only recognises ``-1`` and ``-1.5`` as numbers and reads ``-1e-4`` as an unknown
    option ("--lr: expected one argument"). This is CPython 3.14's own rule (gh-123945, gh-124321):
    a dash followed by a digit, or by a dot and a digit, is a value. Sub-commands inherit it, since
    ``add_subparsers`` builds them with the parser's own class.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"-\.?\d")


def format_size(size_bytes: int) -> str:
    if size_bytes >= 1_000_000:
        return f"{size_bytes / 1e6:.1f} MB"
    return f"{size_bytes / 1e3:.1f} kB"


def quiet_libraries() -> None:
    """Our progress bar and messages only: no per-file loading bars or library chatter."""
    import warnings

    import diffusers
    import transformers
    from PIL import Image

    for library in (diffusers, transformers):
        library.utils.logging.set_verbosity_error()
        library.utils.logging.disable_progress_bar()
    # The dataset check reports oversized pictures and bad EXIF itself, saying what to do; Pillow's
    # own warnings ("could be decompression bomb DOS attack") would only alarm.
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    warnings.filterwarnings("ignore", message="Corrupt EXIF data", module="PIL")
