"""What one running app holds: the project folder, the run controller and the loaded generator.

Created by ``app.ui.build_app`` (never at import) and handed to each tab's builder, so tabs share
state through this object instead of globals, and tests can build an app on a temporary folder.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.projects import Projects
from app.runs import RunController, TrainFn


@dataclass
class Studio:
    projects: Projects
    runs: RunController
    _tokenizer: Any = field(default=None, repr=False)
    _generator: Any = field(default=None, repr=False)
    _generator_key: tuple[str, str] | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    # Model construction (training setup, generator loading, meta-device sizing) one at a time:
    # trainer.sizing builds modules under accelerate's init_empty_weights, which patches torch
    # for every thread while it runs.
    build_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def create(cls, projects_root: str | Path, train_fn: TrainFn | None = None) -> Studio:
        build_lock = threading.Lock()
        return cls(projects=Projects(projects_root, build_lock).ensure(), runs=RunController(train_fn, build_lock),
                   build_lock=build_lock)

    def count_tokens(self, caption: str) -> int:
        """CLIP tokens of a caption (the dataset linter's 75-token check), with the bundled tokenizer."""
        with self._lock:
            if self._tokenizer is None:
                from transformers import CLIPTokenizer

                from trainer.models import TOKENIZER_DIR

                self._tokenizer = CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR))
            tokenizer = self._tokenizer
        from trainer.text import count_tokens

        return count_tokens(tokenizer, caption)

    def generator(self, base_choice: str, base_config: str = "") -> Any:
        """The Generator for this base model, kept loaded between requests (reloaded when it changes)."""
        base = self.projects.resolve_base(base_choice)
        key = (base, base_config)
        with self._lock:
            if self._generator is None or self._generator_key != key:
                from trainer.generate import Generator

                self._generator = None  # free the old model before loading the next
                with self.build_lock:
                    self._generator = Generator.from_base(base, base_config=base_config)
                self._generator_key = key
            return self._generator

    def close(self) -> None:
        self.runs.shutdown()
        with self._lock:
            self._generator = None
