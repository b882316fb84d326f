"""A run's settings back in the Train tab: from a run of this session, or from a config TOML.

After a reload mid-run the form shows the settings of the run on screen; "Load settings from this
run" does the same for any run picked under "Showing run"; the settings can also be saved as a
config TOML (the file ``lora-studio train --config`` reads) and loaded from one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from app.projects import Projects, safe_name
from trainer.config.presets import resolve_config
from trainer.config.schema import (
    StudioConfig,
    config_from_dict,
    config_to_dict,
    load_toml,
    merge_dicts,
    save_toml,
)
from trainer.core.errors import ConfigError


@dataclass(frozen=True)
class TabPickers:
    """The Train tab's own pickers for a config (the form shows the rest)."""

    dataset: str | None  # the dataset's name when it is one of the project's datasets
    base: str  # the base-model field's value (the demo label for the demo model)
    run_name: str


def pickers_for(projects: Projects, config: StudioConfig) -> TabPickers:
    data = Path(config.data.data) if config.data.data else None
    dataset = data.name if data is not None and data.parent == projects.datasets_dir and data.is_dir() else None
    output = Path(config.output.output).stem if config.output.output else ""
    return TabPickers(dataset, projects.base_choice_for(config.model.base) if config.model.base else "", output)


def loaded_file_notes(projects: Projects, config: StudioConfig) -> list[str]:
    """What a loaded config names that the tab's pickers cannot show, so the run would not use it."""
    data = config.data.data.strip()
    if data and pickers_for(projects, config).dataset is None:
        return [f"The file's picture folder `{data}` is not one of this project's datasets, so the Dataset box "
                "keeps its choice and training would use that dataset. Copy the folder in on the Dataset tab "
                "(*Copy folder into the dataset*), then pick that dataset here."]
    return []


def settings_file(projects: Projects, config: StudioConfig) -> Path:
    """Write ``config`` (every field) as ``outputs/configs/<run name>.toml``; returns the path."""
    folder = projects.outputs_dir / "configs"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{safe_name(Path(config.output.output).stem or 'run', 'file name')}.toml"
    save_toml(config, path)
    return path


def config_from_file(path: str | Path) -> StudioConfig:
    """A config TOML (a full one, or a few sections) over the defaults, validated."""
    path = Path(path)
    if path.suffix.lower() != ".toml":
        raise ConfigError(f"{path.name} is not a .toml file.",
                          hint="Load a config saved with 'Save settings as TOML' or 'lora-studio train --save-config'.")
    data = load_toml(path)
    data.pop("description", None)  # a preset file's note
    return config_from_dict(merge_dicts(config_to_dict(resolve_config(None)), data))
