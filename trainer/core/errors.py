"""The one exception family users see.

Every error a user can cause (bad config, unreadable dataset, wrong model file, ...) is a
``StudioError`` whose message says what went wrong and what to do about it. The CLI prints
it as one line; the GUI turns it into ``gr.Error`` in exactly one place. Anything else that
escapes is a bug in LoRA Studio.
"""

from __future__ import annotations


class StudioError(Exception):
    """A problem the user can fix; ``str(error)`` is the full, actionable message."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(f"{message} {hint}" if hint else message)


class ConfigError(StudioError):
    """A config value is missing, of the wrong type or out of range."""


class DatasetError(StudioError):
    """The dataset folder cannot be used for training."""


class ImageError(StudioError):
    """One image file cannot be read; the dataset reports and skips it."""


class ModelLoadError(StudioError):
    """The base model cannot be found, read or is not a supported family."""


class LoraFileError(StudioError):
    """A LoRA file is unsafe, corrupt, or does not fit the loaded base model."""


class CheckpointError(StudioError):
    """A training checkpoint cannot be resumed from."""


class TrainingError(StudioError):
    """Training cannot continue (NaN loss, out of memory, ...)."""
