"""What one running app holds: the project folder, the run controller and the loaded generator.

Created by ``app.ui.build_app`` (never at import) and handed to each tab's builder, so tabs share
state through this object instead of globals, and tests can build an app on a temporary folder.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.access import PathRule
from app.projects import Projects
from app.runs import RunController, RunState, TrainFn, shares_accelerator

GPU_WAIT_POLL_S = 5.0  # how often a waiting generation re-reads the run it waits for (it also wakes on changes)


@dataclass
class Studio:
    projects: Projects
    runs: RunController
    _tokenizer: Any = field(default=None, repr=False)
    _generator: Any = field(default=None, repr=False)
    _generator_key: tuple[str, str] | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    # Model construction (training setup, generator loading, meta-device sizing) one at a time:
    # trainer.lora.sizing builds modules under accelerate's init_empty_weights, which patches torch
    # for every thread while it runs.
    build_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    # Held by a generation from loading the model to the last image, and by a training run while it
    # makes room on its GPU: one model on an accelerator at a time (gradio's "gpu" queue already
    # runs one GPU job at a time; training runs in the run worker, outside that queue).
    _gpu: threading.Lock = field(default_factory=threading.Lock, repr=False)
    # One memory/time estimator per base model: it keeps the shape counts of each resolution and
    # target set, so changing rank, batch or precision in the form re-estimates without a meta forward.
    _estimators: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.runs.before_run = self.make_room_for_training

    @classmethod
    def create(cls, projects_root: str | Path, train_fn: TrainFn | None = None, *, listen: bool = False,
               allowed_folders: Sequence[str | Path] = ()) -> Studio:
        """``listen``: the server answers other machines, so request paths are confined (``app.access``)."""
        build_lock = threading.Lock()
        root = Path(projects_root).expanduser().resolve()
        paths = PathRule.for_server(root, listen=listen, allowed=allowed_folders)
        return cls(projects=Projects(root, build_lock, paths).ensure(), runs=RunController(train_fn, build_lock),
                   build_lock=build_lock)

    def generation_device(self) -> str:
        """Where the generator runs, as ``Generator.from_base`` picks it: the first CUDA GPU, else the CPU."""
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    @contextmanager
    def gpu_job(self, on_wait: Callable[[RunState], None]) -> Iterator[None]:
        """Hold the generation device for one job.

        On a GPU a training run already holds its model, optimiser and activations; a generator
        beside it would need a second model in memory and slow both, so the job waits until the run
        ends (``on_wait`` is told which run, again after each change). On the CPU both go ahead.
        """
        device = self.generation_device()
        while True:
            self._gpu.acquire()
            run = self.runs.training_on(device)
            if run is None:
                break
            self._gpu.release()
            on_wait(run)
            self.runs.wait_for_change(run.id, run.version, GPU_WAIT_POLL_S)
        try:
            yield
        finally:
            self._gpu.release()

    def estimator(self, source: str) -> Any:
        """The ``trainer.train.estimate.Estimator`` of a base model (folder, or bundled family name); call under build_lock."""
        from trainer.train.estimate import Estimator

        if source not in self._estimators:
            self._estimators[source] = Estimator(source)
        return self._estimators[source]

    def make_room_for_training(self, device: str) -> None:
        """Before a run loads its model on ``device``: let a generation in flight finish, unload the generator there."""
        with self._gpu, self._lock:
            if self._generator is not None and shares_accelerator(str(self._generator.device), device):
                self._generator, self._generator_key = None, None
                import torch

                torch.cuda.empty_cache()

    def count_tokens(self, caption: str) -> int:
        """CLIP tokens of a caption (the dataset linter's 75-token check), with the bundled tokenizer."""
        with self._lock:
            if self._tokenizer is None:
                from transformers import CLIPTokenizer

                from trainer.models.family import TOKENIZER_DIR

                self._tokenizer = CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR))
            tokenizer = self._tokenizer
        from trainer.models.text import count_tokens

        return count_tokens(tokenizer, caption)

    def generator(self, base_choice: str, base_config: str = "") -> Any:
        """The Generator for this base model, kept loaded between requests (reloaded when it changes)."""
        base = self.projects.resolve_base(base_choice)
        base_config = base_config or self.projects.base_config_for(base)  # a baked checkpoint knows its configs
        key = (base, base_config)
        with self._lock:
            if self._generator is None or self._generator_key != key:
                from trainer.generate.generator import Generator

                self._generator = None  # free the old model before loading the next
                with self.build_lock:
                    self._generator = Generator.from_base(base, base_config=base_config)
                self._generator_key = key
            return self._generator

    def close(self) -> None:
        self.runs.shutdown()
        with self._lock:
            self._generator = None
