"""Presets: named, sparse overrides of the config defaults.

A preset is a TOML file of the same shape as a run config plus a top-level ``description``.
The effective config of a run is: dataclass defaults ⊕ preset ⊕ config file ⊕ explicit
overrides (CLI flags or GUI fields), later ones winning field by field.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from trainer.config.schema import (
    StudioConfig,
    config_from_dict,
    load_toml,
    merge_dicts,
    nest_flat,
)
from trainer.core.errors import ConfigError

BUILTIN_PACKAGE = "trainer.config.builtin_presets"  # the top-level presets/ folder (pyproject maps it)
DEFAULT_PRESET = "character"


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    overrides: dict[str, dict[str, Any]]  # section -> field -> value
    path: Path | Traversable


def builtin_presets_dir() -> Traversable:
    """The shipped presets, wherever the package is installed (wheel, editable or checkout)."""
    return resources.files(BUILTIN_PACKAGE)


def list_presets() -> list[Preset]:
    """The built-in presets, sorted by name."""
    files = [f for f in builtin_presets_dir().iterdir() if f.name.endswith(".toml")]
    return [_read_preset(f) for f in sorted(files, key=lambda f: f.name)]


def load_preset(name_or_path: str) -> Preset:
    """A built-in preset by name, or any preset TOML file by path."""
    candidate = builtin_presets_dir().joinpath(f"{name_or_path}.toml")
    if "/" not in name_or_path and "\\" not in name_or_path and candidate.is_file():
        return _read_preset(candidate)
    path = Path(name_or_path).expanduser()
    if path.suffix == ".toml" and path.is_file():
        return _read_preset(path)
    names = ", ".join(p.name for p in list_presets())
    if path.suffix == ".toml":
        problem = "is a folder, not a preset file" if path.is_dir() else "does not exist"
        raise ConfigError(f"The preset file {path} {problem}.",
                          hint=f"Check the path, or use a built-in preset: {names}.")
    raise ConfigError(f"Unknown preset '{name_or_path}'.", hint=f"Use one of: {names}, or the path of a .toml preset.")


def resolve_config(
    preset: str | None = DEFAULT_PRESET,
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> StudioConfig:
    """defaults ⊕ preset ⊕ config file ⊕ flat overrides (``{"rank": 8}``), validated once."""
    merged: dict[str, Any] = {}
    if preset:
        merged = merge_dicts(merged, load_preset(preset).overrides)
    if config_file:
        merged = merge_dicts(merged, load_toml(config_file))
    if overrides:
        merged = merge_dicts(merged, nest_flat(overrides))
    return config_from_dict(merged)


def _read_preset(path: Path | Traversable) -> Preset:
    with resources.as_file(path) as real_path:  # a real file even from a zipped install
        data = load_toml(real_path)
    description = str(data.pop("description", ""))
    config_from_dict(data)  # a broken preset fails here, naming its field
    return Preset(name=path.name.removesuffix(".toml"), description=description, overrides=data, path=path)
