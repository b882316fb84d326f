"""Regularization pictures made from the base model: N seeded pictures of the class prompt.

Prior preservation trains the LoRA to leave "a woman" (the class) as the base model draws it;
the pictures it compares against are best made by that same model. Each picture is named after
the prompt and its seed and gets the prompt as its ``.txt`` caption, so a run that stopped (or a
larger N later) continues where it left off and the folder is ready for ``--reg-data``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from trainer.core.atomic import atomic_write_text
from trainer.core.errors import ConfigError
from trainer.core.output_paths import check_output_folder
from trainer.generate.infotext import save_png
from trainer.generate.requests import GenerationRequest
from trainer.generate.schedulers import DEFAULT_SAMPLER

MAX_REG_IMAGES = 10_000


@dataclass(frozen=True)
class RegImagesRequest:
    class_prompt: str
    count: int
    seed: int = 0  # picture i uses seed + i
    negative_prompt: str = ""
    steps: int = 25
    cfg_scale: float = 7.0
    width: int = 0  # 0 = the model's native size
    height: int = 0
    scheduler: str = DEFAULT_SAMPLER

    def __post_init__(self) -> None:
        if not self.class_prompt.strip():
            raise ConfigError("No class prompt is given.",
                              hint="Describe the class your subject belongs to, e.g. 'a woman' or 'a cat'.")
        if not 1 <= self.count <= MAX_REG_IMAGES:
            raise ConfigError(f"The number of pictures ({self.count}) is out of range.",
                              hint=f"Make 1 to {MAX_REG_IMAGES} (about as many as your training samples per epoch).")
        if self.seed < 0:
            raise ConfigError(f"The seed {self.seed} is negative.", hint="Use 0 or a positive number.")

    def generation(self, seed: int) -> GenerationRequest:
        return GenerationRequest(prompt=self.class_prompt.strip(), negative_prompt=self.negative_prompt, seed=seed,
                                 steps=self.steps, cfg_scale=self.cfg_scale, width=self.width, height=self.height,
                                 scheduler=self.scheduler)


@dataclass(frozen=True)
class RegImagesProgress:
    done: int
    total: int
    elapsed_s: float

    @property
    def eta_s(self) -> float | None:
        return self.elapsed_s / self.done * (self.total - self.done) if self.done and self.elapsed_s > 0 else None


def reg_image_path(folder: Path, prompt: str, seed: int) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.casefold()).strip("-")[:40] or "class"
    return folder / f"{slug}-{seed:06d}.png"


def make_reg_images(generator, request: RegImagesRequest, folder: str | Path,
                    on_progress: Callable[[RegImagesProgress], None] | None = None,
                    should_stop: Callable[[], bool] | None = None) -> list[Path]:
    """Render the pictures ``request`` asks for into ``folder`` (those already there are kept);
    returns every picture of the request, made now or before. ``generator`` is a
    ``trainer.generate.Generator`` of the base model."""
    folder = check_output_folder(folder, label="The regularization folder")
    generator.prepare(request.generation(request.seed))  # a bad size or step count fails before any folder is made
    folder.mkdir(parents=True, exist_ok=True)
    paths, started = [], time.perf_counter()
    for i in range(request.count):
        if should_stop is not None and should_stop():
            break
        seed = request.seed + i
        path = reg_image_path(folder, request.class_prompt, seed)
        if not path.is_file():
            made = generator.generate(request.generation(seed))[0]
            save_png(made.image, path, made.infotext)
        atomic_write_text(path.with_suffix(".txt"), request.class_prompt.strip() + "\n")
        paths.append(path)
        if on_progress is not None:
            on_progress(RegImagesProgress(i + 1, request.count, time.perf_counter() - started))
    return paths
