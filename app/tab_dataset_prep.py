"""The Dataset tab's preparation panel: auto-captioning, the tag table, masks and reg pictures.

``build_dataset_prep_panel`` lays out and wires one panel under the caption grid; the handlers
are in ``app.dataset_prep``. It refreshes the tab's grid through the ``refresh`` function the
tab hands it, so the two modules share no state. Overwriting captions asks first; every caption
change can be undone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import gradio as gr

from app import dataset_prep as prep
from app.errors import user_errors
from app.studio import Studio


def build_dataset_prep_panel(studio: Studio, *, name: gr.Dropdown, trigger: gr.Textbox, lint_inputs: Sequence[Any],
                             refresh: Callable[..., tuple], refresh_outputs: Sequence[Any],
                             refresh_triggers: Sequence[Any]) -> None:
    """``refresh(name, *lint_inputs)`` returns values for ``refresh_outputs`` (the grid and report);
    ``refresh_triggers`` are the tab's events after which the tag table is recounted."""
    with gr.Accordion("Auto-caption the pictures", open=False, elem_id="dataset-caption-panel") as caption_panel:
        with gr.Row():
            kind = gr.Radio([prep.TAGGER, prep.CAPTIONER], value=prep.TAGGER, label="Model kind",
                            elem_id="dataset-caption-kind", scale=2)
            choices = prep.model_choices(studio, prep.TAGGER)
            model = gr.Dropdown(choices=choices, value=choices[0] if choices else None, allow_custom_value=True,
                                label="Model", info="A folder in the project's models/, any folder path, or a hub id.",
                                elem_id="dataset-caption-model", scale=3)
            mode = gr.Radio(["skip", "append", "overwrite"], value="skip", label="Pictures that have a caption",
                            info="skip them, append new tags, or overwrite (asks first; undo brings them back)",
                            elem_id="dataset-caption-mode", scale=3)
        model_info = gr.Markdown(prep.model_help(studio, prep.TAGGER), elem_id="dataset-caption-help")
        with gr.Row(visible=True) as tagger_row:
            general = gr.Slider(0, 1, value=0.35, step=0.01, label="General tag threshold",
                                elem_id="dataset-caption-general")
            character = gr.Slider(0, 1, value=0.85, step=0.01, label="Character tag threshold",
                                  elem_id="dataset-caption-character")
            max_tags = gr.Number(value=0, precision=0, label="Max tags (0 = all)", elem_id="dataset-caption-max")
            blacklist = gr.Textbox(label="Never write these tags", placeholder="solo, simple background",
                                   elem_id="dataset-caption-blacklist")
            ratings = gr.Checkbox(value=False, label="Rating tag", elem_id="dataset-caption-ratings")
            underscores = gr.Checkbox(value=False, label="Keep underscores", elem_id="dataset-caption-underscores")
        with gr.Row(visible=False) as captioner_row:
            prompt = gr.Textbox(label="Prompt or task", elem_id="dataset-caption-prompt",
                                info="BLIP: a start such as 'a picture of'; Florence-2: <CAPTION>, <DETAILED_CAPTION>, "
                                     "<MORE_DETAILED_CAPTION> (default); chat models: an instruction.")
        with gr.Row():
            batch = gr.Number(value=8, precision=0, label="Batch size", elem_id="dataset-caption-batch", scale=1)
            run = gr.Button("Caption the pictures", variant="primary", elem_id="dataset-caption-run", scale=2)
            undo = gr.Button("Undo the last caption change", elem_id="dataset-caption-undo", scale=2)
        with gr.Row(visible=False, elem_id="dataset-caption-confirm-row") as confirm_row:
            confirm_text = gr.Markdown(elem_id="dataset-caption-confirm-text")
            confirm = gr.Button("Replace them", variant="stop", elem_id="dataset-caption-confirm")
            cancel = gr.Button("Cancel", elem_id="dataset-caption-cancel")
        caption_status = gr.Markdown(elem_id="dataset-caption-status")

    with gr.Accordion("Tags: how often each one occurs", open=False, elem_id="dataset-tags-panel"):
        tag_summary = gr.Markdown(elem_id="dataset-tags-summary")
        tags = gr.Dataframe(headers=prep.TAG_HEADERS, datatype=["str", "str", "str", "str"], type="array",
                            interactive=False, wrap=True, max_height=420, column_widths=["30%", "12%", "12%", "46%"],
                            label="Tags of the captions as training reads them (trigger included)",
                            elem_id="dataset-tags", row_count=0)
        gr.Markdown("Masks: a picture with `name.mask.png` beside it (white = learn, black = ignore), or with "
                    "transparency, shows its ignored part in red in the grid; turn on *Masked loss* in the Train "
                    "tab to use them.", elem_id="dataset-masks-help")

    with gr.Accordion("Make regularization pictures", open=False, elem_id="dataset-reg-panel"):
        gr.Markdown("Class pictures from the base model for prior preservation: the LoRA learns your subject "
                    "without changing how the model draws the class in general.")
        with gr.Row():
            bases = studio.projects.base_model_choices()
            reg_base = gr.Dropdown(choices=bases, value=bases[0] if bases else None, allow_custom_value=True,
                                   label="Base model (the one you will train on)", elem_id="dataset-reg-base", scale=3)
            reg_prompt = gr.Textbox(label="Class prompt", placeholder="a woman", elem_id="dataset-reg-prompt", scale=3)
            reg_negative = gr.Textbox(label="Negative prompt", elem_id="dataset-reg-negative", scale=2)
        with gr.Row():
            reg_count = gr.Number(value=50, precision=0, label="Pictures", elem_id="dataset-reg-count")
            reg_seed = gr.Number(value=0, precision=0, label="Seed of the first", elem_id="dataset-reg-seed")
            reg_steps = gr.Number(value=25, precision=0, label="Steps", elem_id="dataset-reg-steps")
            reg_make = gr.Button("Make regularization pictures", variant="primary", elem_id="dataset-reg-make")
        reg_status = gr.Markdown(elem_id="dataset-reg-status")

    settings_inputs = [kind, model, mode, trigger, general, character, blacklist, max_tags, ratings, underscores,
                       prompt, batch]

    def settings_of(values: Sequence[Any]) -> prep.CaptionSettings:
        return prep.CaptionSettings(*values)

    def switch_kind(picked: str):
        found = prep.model_choices(studio, picked)
        return (gr.update(choices=found, value=found[0] if found else None), prep.model_help(studio, picked),
                gr.update(visible=picked == prep.TAGGER), gr.update(visible=picked != prep.TAGGER))

    def refresh_models(picked: str, current: str | None):
        found = prep.model_choices(studio, picked)
        value = current if current else (found[0] if found else None)
        return gr.update(choices=found, value=value), prep.model_help(studio, picked)

    @user_errors
    def caption(dataset: str, confirmed: bool, *values: Any, progress: gr.Progress = gr.Progress()):
        settings = settings_of(values)
        if settings.mode == "overwrite" and not confirmed:
            existing = prep.captioned_count(studio, dataset)
            if existing:
                text = (f"**Overwrite {existing} existing caption{'s' * (existing != 1)}?** "
                        "The old text is kept: *Undo the last caption change* brings it back.")
                return gr.update(visible=True), text, ""
        status = prep.caption_dataset(studio, dataset, settings, lambda f, text: progress(f, desc=text))
        return gr.update(visible=False), "", status

    @user_errors
    def undo_last(dataset: str):
        return prep.undo_captions(studio, dataset)

    @user_errors
    def recount(dataset: str, trigger_word: str):
        return prep.tag_rows(studio, dataset, trigger_word)

    @user_errors
    def make_reg(base: str, class_prompt: str, count: float, seed: float, steps: float, negative: str,
                 progress: gr.Progress = gr.Progress()):
        return prep.make_reg_pictures(studio, base, class_prompt, int(count or 0), int(seed or 0), int(steps or 0),
                                      negative, lambda f, text: progress(f, desc=text))

    kind.change(switch_kind, kind, [model, model_info, tagger_row, captioner_row], api_name=False)
    caption_panel.expand(refresh_models, [kind, model], [model, model_info], api_name=False)  # models added meanwhile
    # Hidden flags rather than gr.State: a script calling /caption_dataset can pass confirmed=True itself.
    no = gr.Checkbox(False, visible=False, label="confirmed", elem_id="dataset-caption-unconfirmed")
    yes = gr.Checkbox(True, visible=False, label="confirmed", elem_id="dataset-caption-confirmed")
    confirm_outputs = [confirm_row, confirm_text, caption_status]
    recount_io = dict(fn=recount, inputs=[name, trigger], outputs=[tags, tag_summary], api_name=False)
    after = [refresh_outputs[i] for i in range(len(refresh_outputs))]
    ran = run.click(caption, [name, no, *settings_inputs], confirm_outputs, api_name="caption_dataset",
                    concurrency_id="gpu", concurrency_limit=1)
    confirmed = confirm.click(caption, [name, yes, *settings_inputs], confirm_outputs, api_name=False,
                              concurrency_id="gpu", concurrency_limit=1)
    undone = undo.click(undo_last, name, caption_status, api_name="undo_captions")
    for event in (ran, confirmed, undone):
        event.success(refresh, [name, *lint_inputs], after, api_name=False).success(**recount_io)
    cancel.click(lambda: (gr.update(visible=False), "", "Nothing was changed."), None, confirm_outputs,
                 api_name=False)
    gr.on(list(refresh_triggers), recount, [name, trigger], [tags, tag_summary], api_name="tag_frequency")
    reg_make.click(make_reg, [reg_base, reg_prompt, reg_count, reg_seed, reg_steps, reg_negative], reg_status,
                   api_name="make_reg_images", concurrency_id="gpu", concurrency_limit=1)
