"""Collecting what diffusers/peft/transformers complain about, for "loads with no warning" tests."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator


class _ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(f"{record.name}: {record.getMessage()}")


@contextlib.contextmanager
def library_warnings() -> Iterator[list[str]]:
    """WARNING+ records of diffusers/peft/transformers plus Python warnings, collected in a list.

    DeprecationWarnings are left out: they are about library internals, not about the file loaded.
    """
    handler = _ListHandler()
    loggers = [logging.getLogger(n) for n in ("diffusers", "peft", "transformers")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.WARNING)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield handler.messages
        finally:
            handler.messages.extend(f"{w.category.__name__}: {w.message}" for w in caught
                                    if not issubclass(w.category, DeprecationWarning))
            for lg, level in zip(loggers, levels):
                lg.removeHandler(handler)
                lg.setLevel(level)
