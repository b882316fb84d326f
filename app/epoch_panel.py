"""The Train tab's parts for choosing the epoch: the sample prompt rows and the "Choose the epoch"
panel (epoch files with their validation loss, Use this epoch, the epoch grid, Continue for N more).

Layout and wiring only; the logic is in ``app.run_epochs``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from app import run_epochs
from app.errors import user_errors
from app.run_view import run_choices
from app.studio import Studio


@dataclass(frozen=True)
class PromptRows:
    rows: gr.Dataframe
    suggest: gr.Button


def build_prompt_rows(studio: Studio, dataset: gr.components.Component, trigger: gr.components.Component,
                      sample_prompts: gr.components.Component) -> PromptRows:
    """One editable row per sample prompt; every edit is written into the form's sample_prompts as kohya lines."""
    with gr.Accordion("Sample prompts (one row each; the same seeds every epoch)", open=True,
                      elem_id="train-prompts-accordion"):
        rows = gr.Dataframe(headers=run_epochs.PROMPT_HEADERS, datatype=["str", "str", "number", "number", "number"],
                            column_count=(5, "fixed"), row_count=2, interactive=True, wrap=True,
                            elem_id="train-prompt-rows",
                            label="Empty seed: the sample seed + the row's index; empty size: the training size.")
        suggest = gr.Button("Suggest prompts from the dataset", elem_id="train-prompts-suggest", size="sm")

    @user_errors
    def suggest_rows(dataset_name: str, trigger_word: str):
        rows_value = run_epochs.default_prompt_rows(studio, dataset_name, trigger_word)
        return rows_value, run_epochs.rows_to_lines(rows_value)

    @user_errors
    def fill_if_empty(dataset_name: str, trigger_word: str, current: str):
        if str(current or "").strip():
            return run_epochs.lines_to_rows(current), current
        return suggest_rows(dataset_name, trigger_word)

    @user_errors
    def write_lines(rows_value) -> str:
        return run_epochs.rows_to_lines(rows_value)

    def follow_text(text: str, rows_value):
        rows_value = run_epochs.rows_following(text, rows_value)
        return gr.skip() if rows_value is None else rows_value

    suggest.click(suggest_rows, [dataset, trigger], [rows, sample_prompts], api_name="suggest_sample_prompts")
    dataset.change(fill_if_empty, [dataset, trigger, sample_prompts], [rows, sample_prompts], api_name=False)
    rows.input(write_lines, [rows], [sample_prompts], api_name="sample_prompt_lines")
    # Both are editors of one setting: a later edit of a row must not undo lines typed in the box.
    sample_prompts.change(follow_text, [sample_prompts, rows], [rows], api_name=False, trigger_mode="always_last",
                          show_progress="hidden")
    return PromptRows(rows, suggest)


def build_epoch_panel(studio: Studio, output_path: gr.Textbox, run_select: gr.Dropdown) -> None:
    """Below the trained file: pick an epoch file, make it the run's output, grid the epochs, train more."""
    with gr.Accordion("Choose the epoch", open=True, elem_id="train-epochs-accordion"):
        with gr.Row():
            run = gr.Dropdown(choices=run_epochs.run_names(studio), value=None, label="Run", allow_custom_value=True,
                              elem_id="train-epoch-run", scale=2)
            epoch_file = gr.Dropdown(choices=[], value=None, label="Epoch file", elem_id="train-epoch-file", scale=3,
                                     info="Saved with 'Save a LoRA file every N epochs'; the lowest validation loss "
                                          "is preselected.")
            use = gr.Button("Use this epoch", variant="primary", elem_id="train-use-epoch", scale=1)
        hint = gr.Markdown(elem_id="train-epoch-hint")
        with gr.Row():
            weights = gr.Textbox("1.0", label="Grid weights", info="Columns per prompt, e.g. 0.6,0.8,1.0.",
                                 elem_id="train-grid-weights", scale=2)
            grid_button = gr.Button("Make an epoch grid", elem_id="train-epoch-grid", scale=1)
        grid_image = gr.Image(label="Epoch grid (rows: epochs, columns: sample prompts × weights)", type="filepath",
                              interactive=False, elem_id="train-grid-image")
        with gr.Row():
            amount = gr.Number(value=2, precision=0, minimum=1, label="Continue for", elem_id="train-continue-amount",
                               scale=1)
            unit = gr.Radio(["epochs", "steps"], value="epochs", label="more", elem_id="train-continue-unit", scale=1)
            more = gr.Button("Continue training", elem_id="train-continue", scale=1)
        status = gr.Markdown(elem_id="train-epoch-status")

    @user_errors
    def show_run(name: str):
        choices, text = run_epochs.epoch_table(studio, name)
        return gr.update(choices=choices, value=run_epochs.best_choice(studio, name)), text

    @user_errors
    def follow_output(path: str):
        names = run_epochs.run_names(studio)
        name = Path(path).stem if path else None
        return gr.update(choices=names, value=name if name in names else None)

    @user_errors
    def use_chosen(name: str, path: str) -> str:
        output = run_epochs.use_epoch(studio, name, path)
        return (f"✔ `{output.name}` now holds **{Path(path).name}** (its A1111 card files too); "
                "Generate lists it and every epoch file.")

    @user_errors
    def make_grid(name: str, weights_text: str, progress: gr.Progress = gr.Progress()):
        def on_progress(event) -> None:
            progress(event.done / max(event.total, 1), desc=f"Cell {min(event.done + 1, event.total)} of {event.total}")

        return str(run_epochs.epoch_grid(studio, name, weights_text, on_progress))

    @user_errors
    def continue_run(name: str, how_many: float, per: str):
        started = studio.runs.submit(name, run_epochs.continue_config(studio, name, how_many, per))
        return (gr.update(choices=run_choices(studio), value=started.id),
                f"Continuing **{name}** for {int(how_many)} more {per}: its epoch files keep their numbers.")

    run.change(show_run, [run], [epoch_file, hint], api_name="epoch_files")
    output_path.change(follow_output, [output_path], [run], api_name=False)
    use.click(use_chosen, [run, epoch_file], [status], api_name="use_epoch")
    grid_button.click(make_grid, [run, weights], [grid_image], api_name="epoch_grid")
    more.click(continue_run, [run, amount, unit], [run_select, status], api_name="continue_run")
