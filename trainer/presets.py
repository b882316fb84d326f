"""Presets: named, sparse overrides of the config defaults.

A preset is a TOML file of the same shape as a run config plus a top-level ``description``.
The effective config of a run is: dataclass defaults ⊕ preset ⊕ config file ⊕ explicit
overrides (CLI flags or GUI fields), later ones winning field by field.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.config import StudioConfig, config_from_dict, load_toml, merge_dicts, nest_flat
from trainer.errors import ConfigError

BUILTIN_DIR = Path(__file__).parent / "builtin_presets"
DEFAULT_PRESET = "character"


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    overrides: dict[str, dict[str, Any]]  # section -> field -> value
    path: Path


def list_presets() -> list[Preset]:
    """The built-in presets, sorted by name."""
    return [_read_preset(path) for path in sorted(BUILTIN_DIR.glob("*.toml"))]


def load_preset(name_or_path: str) -> Preset:
    """A built-in preset by name, or any preset TOML file by path."""
    candidate = BUILTIN_DIR / f"{name_or_path}.toml"
    if candidate.is_file():
        return _read_preset(candidate)
    path = Path(name_or_path)
    if path.suffix == ".toml" and path.is_file():
        return _read_preset(path)
    names = ", ".join(p.name for p in list_presets())
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


def _read_preset(path: Path) -> Preset:
    data = load_toml(path)
    description = str(data.pop("description", ""))
    config_from_dict(data)  # a broken preset fails here, naming its field
    return Preset(name=path.stem, description=description, overrides=data, path=path)
