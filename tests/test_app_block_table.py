"""The Train tab's per-block table turns into kohya's block_dims / block_alphas / block_lr and back."""

from __future__ import annotations

import gradio as gr
import pytest

from app.block_table import HEADERS, block_table_widget, fields_to_rows, rows_to_fields
from trainer.config.presets import resolve_config


def test_an_empty_table_leaves_every_block_setting_off() -> None:
    rows = fields_to_rows({})
    assert [r[0] for r in rows[:2]] + [rows[12][0], rows[-1][0]] == ["IN00", "IN01", "MID", "OUT11"]
    assert rows_to_fields(rows, 16, 8.0) == {"block_dims": "", "block_alphas": "", "block_lr": ""}


def test_edited_cells_become_full_lists_with_the_network_values_elsewhere() -> None:
    rows = fields_to_rows({})
    rows[1][1], rows[12][3] = 8, 0.5  # IN01 at rank 8, the mid block at half the learning rate
    fields = rows_to_fields(rows, 16, 8.0)
    assert fields["block_dims"].split(",")[:3] == ["16", "8", "16"] and len(fields["block_dims"].split(",")) == 25
    assert fields["block_alphas"] == ""
    assert fields["block_lr"].split(",")[12] == "0.5" and set(fields["block_lr"].split(",")) == {"1", "0.5"}
    config = resolve_config("character", overrides=fields)  # the engine accepts what the table writes
    assert config.network.block_dims == fields["block_dims"]
    assert fields_to_rows(fields)[1][1:] == ["8", "", "1"]  # and the table shows it again


@pytest.mark.parametrize("count, first, last", [(25, "IN00", "OUT11"), (23, "BASE", "OUT")])
def test_the_table_follows_the_family_of_a_saved_list(count, first, last) -> None:
    rows = fields_to_rows({"block_lr": ",".join(["1"] * count)})
    assert (len(rows), rows[0][0], rows[-1][0]) == (count, first, last)


def test_the_table_has_its_four_columns_fixed() -> None:
    """The artist edits cells; they cannot add or delete a column (gradio 6 ignores ``col_count``)."""
    with gr.Blocks():
        table = block_table_widget({})
    assert list(table.get_config()["col_count"]) == [len(HEADERS), "fixed"] == [4, "fixed"]
