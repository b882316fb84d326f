"""An epoch grid: one picture, rows = LoRA files (epochs), columns = prompts × weights, same seeds.

A1111's X/Y plot, for the question "which epoch?": every cell of a column shares prompt, seed,
size, CFG, steps and sampler, so the rows differ only by the file. Labels are drawn on the
margins (file name on the left, prompt and weight on top). The base model is loaded once; the
files come and go as adapters on the same ``Generator``.
"""

from __future__ import annotations

import glob
import re
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from trainer.core.errors import ConfigError
from trainer.generate.prompt_file import SamplePrompt

_NUMBERED = re.compile(r"^(.*)-(?:step)?(\d{6,8})$")  # kohya's epoch/step file names
LABEL_PAD = 6


@dataclass(frozen=True)
class GridProgress:
    done: int  # cells finished
    total: int
    label: str  # the cell being rendered next ("zxq-000002 · prompt 1 · 0.8")


@dataclass(frozen=True)
class EpochGrid:
    image: object  # PIL.Image
    row_labels: tuple[str, ...]
    column_labels: tuple[str, ...]
    cell_size: tuple[int, int]  # (width, height) of one cell
    origin: tuple[int, int]  # (x, y) of the first cell: the label margins


def grid_files(patterns: Sequence[str]) -> list[Path]:
    """Expand quoted globs ('out/zxq-*.safetensors') into files, epochs in order, an unnumbered
    (final) file after the numbered ones of its name."""
    files: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(str(Path(pattern).expanduser()))) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise ConfigError(f"No LoRA file matches {pattern}.", hint="Check the folder and the pattern (quote it).")
        for match in matches:
            path = Path(match).expanduser()
            if not path.exists():
                raise ConfigError(f"LoRA file not found: {path}.", hint="Check the path.")
            if path not in files and not path.name.endswith((".json", ".png")):
                files.append(path)
    return sorted(files, key=_file_order)


def _file_order(path: Path) -> tuple[str, int, str]:
    match = _NUMBERED.match(path.stem)
    if match:
        return match.group(1), int(match.group(2)), path.name
    return path.stem, 10 ** 9, path.name  # the final file of a run sorts after its epochs


def render_grid(generator, files: Sequence[Path], prompts: Sequence[SamplePrompt], weights: Sequence[float],
                *, clip_skip: int = 1, on_progress: Callable[[GridProgress], None] | None = None) -> EpochGrid:
    """Render every (file, prompt, weight) cell with ``generator`` and lay them out, labelled."""
    from trainer.generate.requests import GenerationRequest, LoraSpec

    if not files or not prompts or not weights:
        raise ConfigError("A grid needs at least one LoRA file, one prompt and one weight.")
    columns = [(prompt, weight) for prompt in prompts for weight in weights]
    total = len(files) * len(columns)
    rows = []
    for row, path in enumerate(files):
        cells = []
        for column, (prompt, weight) in enumerate(columns):
            if on_progress is not None:
                on_progress(GridProgress(row * len(columns) + column, total,
                                         f"{path.stem} · prompt {column // len(weights) + 1} · {weight:g}"))
            request = GenerationRequest(prompt.prompt, negative_prompt=prompt.negative, seed=prompt.seed,
                                        steps=prompt.steps, cfg_scale=prompt.cfg, width=prompt.width,
                                        height=prompt.height, scheduler=prompt.sampler,
                                        loras=(LoraSpec(str(path), weight),), clip_skip=clip_skip)
            cells.append(generator.generate(request)[0].image)
        rows.append(cells)
    if on_progress is not None:
        on_progress(GridProgress(total, total, "done"))
    column_labels = tuple(f"{_short(prompt.prompt)} @ {weight:g}" if len(weights) > 1 else _short(prompt.prompt)
                          for prompt, weight in columns)
    return draw_grid(rows, tuple(path.stem for path in files), column_labels)


def draw_grid(rows: Sequence[Sequence], row_labels: Sequence[str], column_labels: Sequence[str]) -> EpochGrid:
    """Cells (PIL images, one size per column: the largest) on a white sheet with label margins."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    cell_w = max(image.width for row in rows for image in row)
    cell_h = max(image.height for row in rows for image in row)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = probe.textbbox((0, 0), "Ag", font=font)[3] + 2
    chars = max(4, cell_w // max(probe.textbbox((0, 0), "x", font=font)[2], 1))
    wrapped = [_wrap_label(label, chars) for label in column_labels]
    top = LABEL_PAD * 2 + line_h * max(label.count("\n") + 1 for label in wrapped)
    left = LABEL_PAD * 2 + max(probe.textbbox((0, 0), label, font=font)[2] for label in row_labels)
    sheet = Image.new("RGB", (left + cell_w * len(column_labels), top + cell_h * len(rows)), "white")
    draw = ImageDraw.Draw(sheet)
    for column, label in enumerate(wrapped):
        draw.multiline_text((left + column * cell_w + LABEL_PAD, LABEL_PAD), label, fill="black", font=font)
    for row, (label, images) in enumerate(zip(row_labels, rows)):
        y = top + row * cell_h
        draw.text((LABEL_PAD, y + cell_h // 2 - line_h // 2), label, fill="black", font=font)
        for column, image in enumerate(images):
            sheet.paste(image.convert("RGB"), (left + column * cell_w, y))
    return EpochGrid(sheet, tuple(row_labels), tuple(column_labels), (cell_w, cell_h), (left, top))


def _wrap_label(label: str, chars: int) -> str:
    """The prompt on up to two lines, the weight (after the last ' @ ') always on its own."""
    prompt, _, weight = label.rpartition(" @ ") if " @ " in label else (label, "", "")
    lines = textwrap.wrap(prompt, chars) or [" "]
    if len(lines) > 2:
        lines = [lines[0], lines[1][: max(chars - 1, 1)] + "…"]
    return "\n".join(lines + ([f"weight {weight}"] if weight else []))


def parse_weights(text: str) -> list[float]:
    """'0.6,0.8,1.0' -> [0.6, 0.8, 1.0]."""
    try:
        weights = [float(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise ConfigError(f"--weights {text!r} is not a list of numbers.", hint="Write them as 0.6,0.8,1.0.") from None
    if not weights:
        raise ConfigError("--weights is empty.", hint="Write them as 0.6,0.8,1.0.")
    return weights


def _short(prompt: str, limit: int = 60) -> str:
    return prompt if len(prompt) <= limit else prompt[: limit - 1] + "…"
