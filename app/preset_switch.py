"""Changing the Train tab's preset without losing what the artist typed.

A preset is a sparse set of overrides. Switching from one to another moves only the settings
the artist has left as the old preset had them; a value they changed (the trigger word, the
steps, the sample prompts...) stays, and the preset's note says which values came from the
preset and which were kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from app.block_table import BLOCK_TABLE, fields_to_rows, rows_to_fields
from app.settings_form import config_values, label_of, widget_to_value
from trainer.config.presets import load_preset, resolve_config


@dataclass(frozen=True)
class PresetSwitch:
    """The form after a preset change: every field's value, and where the changed ones came from."""

    values: dict[str, Any]  # field name -> widget value
    from_preset: list[str]  # fields set by the new preset (their value differs from before)
    kept: list[str]  # fields the artist had changed, left as they were

    def note(self, preset: str) -> str:
        """The preset's description and what the switch did, for the line under the preset picker."""
        lines = [load_preset(preset).description]
        if self.from_preset:
            lines.append("**From the preset:** " + ", ".join(f"{label_of(n)} {_shown(self.values[n])}"
                                                              for n in self.from_preset) + ".")
        if self.kept:
            lines.append("**Kept your values:** " + ", ".join(label_of(n) for n in self.kept) +
                         " (set them back by hand to use the preset's).")
        return "\n\n".join(lines)


def switch_preset(old: str | None, new: str, current: dict[str, Any]) -> PresetSwitch:
    """The form's values for preset ``new`` when it showed ``current`` under preset ``old``."""
    before = config_values(resolve_config(old or None))
    after = config_values(resolve_config(new or None))
    current = dict(current)
    table = current.pop(BLOCK_TABLE, None)
    if table is not None:  # the per-block table stands for its three comma-separated fields
        current.update(rows_to_fields(table, current.get("rank"), current.get("alpha")))
    values, from_preset, kept = {}, [], []
    for name, shown in current.items():
        untouched = name not in before or _same(name, shown, before[name])
        if untouched:
            values[name] = after[name]
            if not _same(name, shown, after[name]):
                from_preset.append(name)
        else:
            values[name] = shown
            if not _same(name, before[name], after[name]):
                kept.append(name)
    values[BLOCK_TABLE] = fields_to_rows(values)  # the form shows the three fields as the table
    return PresetSwitch(values, from_preset, kept)


def typed_fields(shown: dict[str, Any], preset: str | None) -> set[str]:
    """The fields of the form ``shown`` whose value differs from preset ``preset``'s: what the artist typed."""
    defaults = config_values(resolve_config(preset or None))
    return {name for name, value in shown.items() if name in defaults and not _same(name, value, defaults[name])}


def _same(name: str, a: Any, b: Any) -> bool:
    """Two widget values of field ``name`` mean the same setting (12 and 12.0; text lists by lines)."""
    return widget_to_value(name, a) == widget_to_value(name, b)


def _shown(value: Any) -> str:
    return f"'{value}'" if isinstance(value, str) else str(value)
