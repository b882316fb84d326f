"""The per-block table of the Train tab's network settings: kohya's block_dims, block_alphas, block_lr.

One row per UNet block (25 for SD 1.x/2.x: IN00-IN11, MID, OUT00-OUT11; 23 for SDXL: BASE, IN0-IN8,
MID0-MID2, OUT0-OUT8, OUT), columns Rank, Alpha and LR factor. An empty cell means "the network's
value" (rank, alpha, 1); a column left empty leaves its setting off. The three config fields stay
comma-separated strings, so TOML files and the CLI read the same thing.
"""

from __future__ import annotations

import math
from typing import Any

import gradio as gr

from trainer.lora.adapters import BLOCK_COUNT, block_names

BLOCK_FIELDS = ("block_dims", "block_alphas", "block_lr")
BLOCK_TABLE = "block_table"  # the form's key for the table (it stands for the three fields)
HEADERS = ["Block", "Rank", "Alpha", "LR factor"]


def family_for(values: dict[str, Any]) -> str:
    """SDXL when a saved list has SDXL's 23 values, else SD 1.x/2.x (25 blocks)."""
    lengths = {len(str(values.get(name) or "").split(",")) for name in BLOCK_FIELDS if values.get(name)}
    return "sdxl" if BLOCK_COUNT["sdxl"] in lengths else "sd1"


def fields_to_rows(values: dict[str, Any]) -> list[list[Any]]:
    """The table's rows for the three comma-separated fields (blank cells where a field is empty)."""
    family = family_for(values)
    columns = []
    for name in BLOCK_FIELDS:
        text = str(values.get(name) or "").replace(" ", "")
        parts = text.split(",") if text else []
        columns.append(parts if len(parts) == BLOCK_COUNT[family] else [""] * BLOCK_COUNT[family])
    return [[label, *(column[i] for column in columns)] for i, label in enumerate(block_names(family))]


def rows_to_fields(rows: Any, rank: Any = None, alpha: Any = None) -> dict[str, str]:
    """The three fields from the table: a column with any value becomes a full list (blanks filled with
    the network's rank/alpha, or 1 for the lr factor); an empty column becomes ""."""
    if hasattr(rows, "values") and hasattr(rows, "columns"):  # a pandas DataFrame
        rows = rows.values.tolist()
    rows = [list(r) for r in rows or []]
    defaults = (rank, alpha, 1)
    fields: dict[str, str] = {}
    for column, (name, default) in enumerate(zip(BLOCK_FIELDS, defaults), start=1):
        cells = [_cell(row[column]) if len(row) > column else "" for row in rows]
        if not any(cells):
            fields[name] = ""
            continue
        fill = "" if default is None else _cell(default)
        fields[name] = ",".join(cell or fill for cell in cells)
    return fields


def block_table_widget(values: dict[str, Any]) -> gr.Dataframe:
    return gr.Dataframe(
        value=fields_to_rows(values), headers=HEADERS, datatype=["str", "number", "number", "number"],
        column_count=(len(HEADERS), "fixed"), interactive=True, elem_id="setting-block-table",
        label="Per-block rank, alpha and learning-rate factor (kohya block_dims / block_alphas / block_lr)",
        show_label=True)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):  # an emptied cell
            return ""
        return f"{value:g}"
    return str(value).strip()
