"""Choosing the epoch in the app: sample prompt rows, a run's epoch files, "Use this epoch", the epoch
grid and "Continue for N more" — the handlers' logic, kept out of the Train tab's layout.

The prompt rows are the editable form of ``output.sample_prompts`` (one kohya line a row); the
epoch panel works on a run by name, so it serves this session's runs and earlier ones alike.
"""

from __future__ import annotations

import copy
import math
import shutil
from pathlib import Path
from typing import Any

from app.run_records import runs_on_disk
from app.studio import Studio
from trainer.config.schema import StudioConfig, config_from_dict, load_toml
from trainer.config.validation import MAX_TRAINING_SEED
from trainer.core.atomic import atomic_path
from trainer.core.errors import ConfigError, StudioError
from trainer.generate.prompt_file import MAX_SIDE
from trainer.train.session import run_dir_for

PROMPT_HEADERS = ["prompt", "negative", "seed", "width", "height"]
DEFAULT_NEGATIVE = "lowres, blurry"
NEW_CONTEXT = "reading a book in a sunny cafe, watercolor"  # a scene the pictures never show: tests flexibility


# --- sample prompt rows ----------------------------------------------------------------------------


def default_prompt_rows(studio: Studio, dataset: str | None, trigger: str) -> list[list[Any]]:
    """One caption-like prompt (the dataset's first caption) and one new-context prompt."""
    from trainer.data.captions import with_trigger

    trigger = str(trigger or "").strip()
    caption = _first_caption(studio, dataset) or trigger or "a picture"
    rows = [[with_trigger(caption, trigger) if trigger else caption, DEFAULT_NEGATIVE, None, None, None]]
    subject = trigger or caption.split(",")[0].strip()
    rows.append([f"{subject}, {NEW_CONTEXT}", DEFAULT_NEGATIVE, None, None, None])
    return rows


def _first_caption(studio: Studio, dataset: str | None) -> str:
    if not dataset:
        return ""
    try:
        folder = studio.projects.dataset_dir(dataset)
    except StudioError:
        return ""
    for caption in sorted(folder.rglob("*.txt")) if folder.is_dir() else ():
        text = caption.read_text(encoding="utf-8", errors="replace").strip()
        if text:
            return text.splitlines()[0]
    return ""


def rows_to_lines(rows: Any) -> str:
    """The rows as kohya prompt lines (what ``sample_prompts`` holds); a bad cell names its row."""
    from dataclasses import replace

    from trainer.generate.prompt_file import parse_prompt_line

    lines = []
    for number, row in enumerate(_table_rows(rows), start=1):
        prompt, negative, seed, width, height = [_cell(cell) for cell in (list(row) + [None] * 5)[:5]]
        if not prompt:
            continue
        where = f"Sample prompt row {number}"
        line = parse_prompt_line(prompt, where)  # the prompt cell may carry its own --l/--s/--ss options
        line = replace(line, negative=negative or line.negative, seed=_int(seed, where, "seed") if seed else line.seed,
                       width=_int(width, where, "width") or line.width, height=_int(height, where, "height") or line.height)
        lines.append(line.text())
    return "\n".join(lines)


def lines_to_rows(text: str) -> list[list[Any]]:
    """``sample_prompts`` text back into rows (options other than --n/--d/--w/--h stay in the prompt cell)."""
    from dataclasses import replace

    from trainer.generate.prompt_file import parse_prompt_line

    rows = []
    for number, line in enumerate(str(text or "").splitlines(), start=1):
        if line.strip() and not line.lstrip().startswith("#"):
            p = parse_prompt_line(line, f"Sample prompt line {number}")
            rest = replace(p, negative="", seed=None, width=0, height=0).text()
            rows.append([rest, p.negative, p.seed, p.width or None, p.height or None])
    return rows


def rows_following(text: str, rows: Any) -> list[list[Any]] | None:
    """The rows for the sample-prompt text when it was typed, loaded from a run or a TOML file, or
    set by a preset; None when the rows already say the same, or while a line is still being typed
    and does not parse yet (Check plan and Start report it then)."""
    try:
        if rows_to_lines(rows) == str(text or "").strip():
            return None
        return lines_to_rows(text)
    except StudioError:
        return None


def _cell(value: Any) -> str:
    """A cell as text; an empty number cell arrives as None or NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    text = str(value).strip()
    return text[:-2] if isinstance(value, float) and text.endswith(".0") else text


def _table_rows(rows: Any) -> list:
    if rows is None:
        return []
    if hasattr(rows, "values") and hasattr(rows, "columns"):  # a pandas frame from gr.Dataframe
        return rows.values.tolist()
    return list(rows)


def _int(value: str, where: str, label: str) -> int:
    if not value:
        return 0
    try:
        number = float(value)
    except ValueError:
        raise ConfigError(f"{where}: the {label} must be a whole number, got {value!r}.") from None
    if not number.is_integer() or number < 0:
        raise ConfigError(f"{where}: the {label} must be a whole number of 0 or more, got {value!r}.")
    if label in ("width", "height") and number and number % 8:
        raise ConfigError(f"{where}: the {label} {int(number)} is not a multiple of 8.")
    high = MAX_TRAINING_SEED if label == "seed" else MAX_SIDE
    if number > high:
        raise ConfigError(f"{where}: the {label} {int(number)} is too large.", hint=f"Use 0 to {high}.")
    return int(number)


# --- a run's epoch files ---------------------------------------------------------------------------


def run_names(studio: Studio) -> list[str]:
    """Every run with a folder on disk, newest first."""
    return [record.name for record in runs_on_disk(studio.projects.runs_dir)]


def epoch_table(studio: Studio, name: str) -> tuple[list[tuple[str, str]], str]:
    """(dropdown choices (label, path) of the run's epoch/step files, the run's best-epoch hint)."""
    from trainer.core.safetensors_header import read_safetensors_header
    from trainer.train.epoch_files import list_saved_loras
    from trainer.train.metrics import best_saved_epoch, read_metrics, suggestion_text

    if not name:
        return [], ""
    output = studio.projects.run_output(name)
    rows = read_metrics(run_dir_for(output))
    losses = {row["step"]: row["val_loss"] for row in rows if "val_loss" in row}
    choices, scored = [], []
    for entry in list_saved_loras(output):
        try:
            step = int(read_safetensors_header(entry.path)[1]["ss_steps"])
        except (OSError, StudioError, KeyError, ValueError):
            continue
        scored.append((entry, step))
        loss = f", validation loss {losses[step]:.4f}" if step in losses else ""
        choices.append((f"{entry.label} ({entry.path.name}{loss})", str(entry.path)))
    hint = suggestion_text(best_saved_epoch(rows, scored), rows) if losses else ""
    return choices, hint


def best_choice(studio: Studio, name: str) -> str | None:
    """The path of the file the hint names (lowest validation loss), else the newest file."""
    from trainer.train.epoch_files import list_saved_loras

    choices, hint = epoch_table(studio, name)
    for _, path in choices:
        if Path(path).name in hint:
            return path
    saved = list_saved_loras(studio.projects.run_output(name)) if name else []
    return str(saved[-1].path) if saved else None


def use_epoch(studio: Studio, name: str, epoch_path: str) -> Path:
    """Make ``epoch_path`` the run's output file (sidecars copied); the replaced output is kept as
    ``name-last.safetensors`` unless an epoch file already holds the same weights."""
    from trainer.lora.sidecars import copy_sidecars, move_sidecars
    from trainer.train.epoch_files import list_saved_loras

    output = studio.projects.run_output(_chosen_run(name))
    chosen = Path(epoch_path or "")
    if chosen not in [s.path for s in list_saved_loras(output)]:
        raise StudioError("Choose one of the run's epoch files first.",
                          hint="Runs save them with 'Save a LoRA file every N epochs'.")
    if output.is_file() and not any(_same_weights(output, s.path) for s in list_saved_loras(output)):
        last = output.with_name(f"{output.stem}-last.safetensors")
        shutil.copyfile(output, last)
        move_sidecars(output, last)
    with atomic_path(output) as tmp:
        shutil.copyfile(chosen, tmp)
    copy_sidecars(chosen, output)
    return output


def _chosen_run(name: str | None) -> str:
    if not str(name or "").strip():
        raise StudioError("No run is chosen.", hint="Pick a run in the Run list first.")
    return str(name).strip()


def _same_weights(a: Path, b: Path) -> bool:
    """Same tensors: the same sshs_model_hash (the hash of the bytes after the header)."""
    from trainer.core.safetensors_header import read_safetensors_header

    try:
        first, second = read_safetensors_header(a)[1].get("sshs_model_hash"), read_safetensors_header(b)[1].get("sshs_model_hash")
    except (OSError, StudioError):
        return False
    return bool(first) and first == second


def continue_config(studio: Studio, name: str, amount: float, unit: str) -> StudioConfig:
    """The saved config of run ``name``, resumed from its newest checkpoint and ``amount`` steps or
    epochs longer than it was."""
    from trainer.train.checkpoints import list_checkpoints

    name = _chosen_run(name)
    amount = int(amount or 0)
    if amount < 1:
        raise ConfigError("Continue for how many? The number must be 1 or more.")
    output = studio.projects.run_output(name)  # a plain name: '../x' cannot reach outside the runs folder
    folder = run_dir_for(output)
    config_file = folder / "config.toml"
    found = list_checkpoints(folder / "checkpoints") if (folder / "checkpoints").is_dir() else []
    if not config_file.is_file() or not found:
        raise StudioError(f"The run '{name}' has no checkpoint to continue from.",
                          hint="Only runs that saved a checkpoint (every run does at its end) can continue.")
    data = copy.deepcopy(load_toml(config_file))
    train = data.setdefault("train", {})
    done = found[-1].step
    if unit == "epochs" and not train.get("steps"):
        epochs_done = _epochs_done(folder, done) or int(train.get("epochs", 1))
        train["epochs"] = epochs_done + amount
    elif unit == "epochs":
        per_epoch = _steps_per_epoch(folder, done)
        if not per_epoch:
            raise StudioError("This run counts steps and its epoch length is unknown.", hint="Continue by steps instead.")
        train["steps"] = done + amount * per_epoch
    else:
        train["steps"] = done + amount
    data.setdefault("output", {})["resume"] = "auto"
    return config_from_dict(data)


def _epochs_done(folder: Path, step: int) -> int:
    from trainer.train.metrics import read_metrics

    rows = [row for row in read_metrics(folder) if row["step"] == step]
    return int(rows[-1]["epoch"]) if rows else 0


def _steps_per_epoch(folder: Path, step: int) -> int:
    epochs = _epochs_done(folder, step)
    return step // epochs if epochs else 0


def epoch_grid(studio: Studio, name: str, weights_text: str, on_progress=None) -> Path:
    """The grid of the run's epoch files (and final file) × its sample prompts × ``weights``, saved as a PNG."""
    from trainer.generate.grid import parse_weights, render_grid
    from trainer.generate.prompt_file import SamplePrompt, sample_prompt_list
    from trainer.generate.schedulers import parse_sampler

    output = studio.projects.run_output(_chosen_run(name))
    config_file = run_dir_for(output) / "config.toml"
    if not config_file.is_file():
        raise StudioError(f"There is no run '{name}' with saved settings in {output.parent}.",
                          hint="Pick a run from the Run list (runs appear there once they have started).")
    config = load_toml(config_file)
    cfg = config_from_dict(config)
    from trainer.train.epoch_files import list_saved_loras

    files = [s.path for s in list_saved_loras(output)] + ([output] if output.is_file() else [])
    if not files:
        raise StudioError(f"The run '{name}' has no LoRA files yet.", hint="Finish (or stop) the run first.")
    lines = sample_prompt_list(cfg.output.sample_prompts) or [SamplePrompt(cfg.data.trigger or "a picture")]
    size = cfg.data.resolution
    prompts = [line.with_defaults(seed=cfg.output.sample_seed + i, width=size, height=size, cfg=7.5,
                                  steps=cfg.output.sample_steps, sampler=parse_sampler(cfg.output.sampler).label)
               for i, line in enumerate(lines)]
    weights = parse_weights(weights_text or "1.0")
    with studio.gpu_job(lambda run: None):  # a training run on the same GPU finishes first
        generator = studio.generator(studio.projects.base_choice_for(cfg.model.base), cfg.model.base_config)
        grid = render_grid(generator, files, prompts, weights, clip_skip=cfg.model.clip_skip, on_progress=on_progress)
    path = studio.projects.new_output_path(f"{name}-grid", ".png")
    with atomic_path(path) as tmp:
        grid.image.save(tmp, format="PNG")
    return path
