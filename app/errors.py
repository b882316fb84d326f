"""The one place where failures become what the page shows.

Every event handler the UI wires is wrapped in ``user_errors``: a ``StudioError`` (anything the
user can fix) becomes a ``gr.Error`` carrying its message and hint; anything else is a bug in
LoRA Studio, logged with its traceback for the terminal and shown as one plain sentence, so the
page never shows a traceback.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import gradio as gr

from trainer.core.errors import StudioError

log = logging.getLogger("lora_studio.app")

F = TypeVar("F", bound=Callable[..., Any])


def as_gr_error(exc: BaseException) -> gr.Error:
    """The page's version of ``exc``: its own message for user errors, one sentence for bugs."""
    if isinstance(exc, gr.Error):
        return exc
    if isinstance(exc, StudioError):
        return gr.Error(str(exc), title=_title(exc), print_exception=False)
    log.error("unexpected error in the app", exc_info=exc)
    return gr.Error(
        f"LoRA Studio hit an internal error ({type(exc).__name__}: {exc}). Your files are unchanged; "
        "please report this together with the log printed in the terminal that started the app.",
        title="Internal error", print_exception=False)


def user_errors(fn: F) -> F:
    """Wrap a handler (plain function or generator) so its failures reach the page as ``gr.Error``."""
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def generator_wrapper(*args: Any, **kwargs: Any):
            try:
                yield from fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - the one conversion point (see module doc)
                raise as_gr_error(exc) from exc
        return generator_wrapper  # type: ignore[return-value]

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - the one conversion point (see module doc)
            raise as_gr_error(exc) from exc
    return wrapper  # type: ignore[return-value]


def _title(exc: StudioError) -> str:
    """A short heading for the toast: 'Dataset problem' for DatasetError, and so on."""
    names = {
        "ConfigError": "Setting problem",
        "DatasetError": "Dataset problem",
        "ImageError": "Image problem",
        "ModelLoadError": "Base model problem",
        "LoraFileError": "LoRA file problem",
        "CheckpointError": "Checkpoint problem",
        "TrainingError": "Training stopped",
    }
    for cls in type(exc).__mro__:
        if cls.__name__ in names:
            return names[cls.__name__]
    return "Problem"
