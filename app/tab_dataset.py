"""Dataset tab: pictures in, captions edited, problems shown before any training.

Handlers are plain functions of the studio and named values; ``build_dataset_tab`` lays out the
components and wires them. Caption edits in the grid are saved to ``.txt`` sidecars right away,
so a reload or a closed tab loses nothing, and every change (a cell, add-trigger, find/replace)
is one step of the dataset's caption undo history.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import gradio as gr

from app.bundled import EXAMPLE_DATASET
from app.dataset_memory import (
    last_dataset,
    remember_dataset,
    remember_trigger,
    remembered_trigger,
)
from app.dataset_prep import masked_thumbnail
from app.errors import user_errors
from app.projects import THUMB_SIDE, safe_name
from app.studio import Studio
from app.tab_dataset_prep import build_dataset_prep_panel
from trainer.config.schema import DataConfig
from trainer.config.validation import MAX_RESOLUTION, MIN_RESOLUTION
from trainer.core.errors import ConfigError, DatasetError, StudioError
from trainer.data.caption_undo import CaptionUndo
from trainer.data.captions import has_trigger, read_caption_file
from trainer.data.images import image_extensions
from trainer.data.lint import LintReport, lint_dataset
from trainer.data.masks import is_mask_file
from trainer.data.scan import DatasetIssue, scan_dataset

TABLE_HEADERS = ["Picture", "File", "Caption (click to edit)", "Problems"]
ISSUE_HEADERS = ["", "File", "Problem", "What to do"]
CAPTION_COLUMN, FILE_COLUMN = 2, 1
SEVERITY_ICON = {"error": "✖", "warning": "⚠", "info": "ℹ"}
DEFAULT_LINT_RESOLUTION = 512


@dataclass(frozen=True)
class DatasetView:
    """Everything the tab shows about one dataset."""

    table: list[list[str]]
    report: str
    issues: list[list[str]]


# --- handlers ------------------------------------------------------------------------------------


def dataset_view(studio: Studio, name: str, trigger: str, resolution: int | float | None) -> DatasetView:
    """Thumbnails, captions (as stored in the sidecars) and the linter's findings."""
    if not str(name or "").strip():
        return DatasetView([], "Choose a dataset, or type a name for a new one and drop pictures in.", [])
    folder = studio.projects.datasets_dir / safe_name(name, "dataset name")
    if not folder.is_dir():
        new = safe_name(name, "dataset name")
        return DatasetView([], f"New dataset **{new}**: drop pictures above to create it.", [])
    images = sorted(p for p in folder.iterdir()
                    if p.is_file() and p.suffix.lower() in image_extensions() and not is_mask_file(p))
    if not images:
        return DatasetView([], f"**{name}** has no pictures yet: drop 20–50 pictures (and their .txt captions) "
                               "above.", [])
    report = lint(studio, folder, trigger, resolution)
    problems: dict[Path, list[DatasetIssue]] = {}
    for issue in report.issues:
        if issue.path is not None:
            problems.setdefault(issue.path.with_suffix(""), []).append(issue)
    rows = []
    for image in images:
        masked = masked_thumbnail(studio, image, THUMB_SIDE)  # the part its mask ignores shown in red
        thumb = masked or studio.projects.thumbnail(image)
        alt = f"{image.name} (masked)" if masked else image.name
        picture = f"![{alt}](/gradio_api/file={quote(str(thumb))})" if thumb else "✖"
        notes = "<br>".join(f"{SEVERITY_ICON[i.severity]} {i.message} *{i.fix}*"
                            for i in problems.get(image.with_suffix(""), []))
        rows.append([picture, image.name, read_caption(studio, image), notes or "✔"])
    issues = [[SEVERITY_ICON[i.severity], i.path.name if i.path else "(all)", i.message, i.fix] for i in report.issues]
    return DatasetView(rows, report_markdown(name, report), issues)


def lint(studio: Studio, folder: Path, trigger: str, resolution: int | float | None) -> LintReport:
    size = lint_resolution(resolution)
    data = DataConfig(data=str(folder), trigger=str(trigger or "").strip())
    scan = scan_dataset(data)
    return lint_dataset(scan, data, size, studio.count_tokens, epochs=1, batch_size=1)


def lint_resolution(resolution: int | float | None) -> int:
    """The 'Check against resolution' box as pixels, in the range training takes (a huge value
    would make millions of aspect buckets and take the server's memory)."""
    size = int(resolution or DEFAULT_LINT_RESOLUTION)
    if not MIN_RESOLUTION <= size <= MAX_RESOLUTION:
        raise ConfigError(f"\"Check against resolution\" = {size} px is out of range.",
                          hint=f"Use {MIN_RESOLUTION} to {MAX_RESOLUTION} px: the size you will train at "
                               "(512 for SD 1.x, 1024 for SDXL, 64 for the demo model).")
    return size


def report_markdown(name: str, report: LintReport) -> str:
    errors, warnings = report.count("error"), report.count("warning")
    verdict = ("✔ Ready to train." if report.ok and not warnings else
               "⚠ Trainable, but look at the warnings below." if report.ok else
               "✖ Fix the errors below before training.")
    lines = [f"### {name}: {report.num_images} usable pictures of {report.num_files}",
             f"{verdict} ({errors} error{'s' * (errors != 1)}, {warnings} warning{'s' * (warnings != 1)})"]
    if report.trigger.strip():
        lines.append(f'Trigger word **"{report.trigger}"** is in {report.trigger_count} of {report.num_images} '
                     "captions.")
    if report.bucket_counts:
        by_size = sorted(report.bucket_counts.items(), key=lambda kv: -kv[1])
        buckets = ", ".join(f"{w}×{h}: {n}" for (w, h), n in by_size)
        lines.append(f"Aspect buckets at {report.resolution} px: {buckets}")
    return "\n\n".join(lines)


def read_caption(studio: Studio, image: Path) -> str:
    sidecar = studio.projects.caption_path(image)
    if not sidecar.is_file():
        return ""
    try:
        return read_caption_file(sidecar)[0]
    except DatasetError:  # not text: the problem column says so (the dataset check reports it)
        return ""


def save_captions(studio: Studio, name: str, table: list[list[Any]], label: str = "") -> int:
    """Write every caption of the grid that differs from its sidecar; returns how many changed.

    The writes form one batch of the dataset's caption undo history (``trainer.data.caption_undo``,
    the one auto-captioning uses), so "Undo the last caption change" takes them back.
    """
    folder = studio.projects.dataset_dir(name)
    changes: list[tuple[Path, str]] = []
    for row in table or []:
        if len(row) <= CAPTION_COLUMN or not str(row[FILE_COLUMN] or "").strip():
            continue
        image = folder / safe_name(str(row[FILE_COLUMN]), "file name")
        if not image.is_file():
            raise DatasetError(f"{row[FILE_COLUMN]} is no longer in dataset '{name}'.",
                               hint="Reload the dataset to see its current pictures.")
        caption = " ".join(str(row[CAPTION_COLUMN] or "").split())
        if caption != read_caption(studio, image):
            changes.append((image, caption))
    if not changes:
        return 0
    if not label:
        label = (f"Edited the caption of {changes[0][0].name}" if len(changes) == 1 else
                 f"Edited {len(changes)} captions in the grid")
    with CaptionUndo(folder).batch(label) as writer:
        for image, caption in changes:
            writer.write(studio.projects.caption_path(image), caption)
    return len(changes)


def with_trigger(table: list[list[Any]], trigger: str) -> list[list[Any]]:
    """The grid with ``trigger`` put first in every caption that lacks it."""
    trigger = str(trigger or "").strip()
    if not trigger:
        raise StudioError("Type a trigger word first.", hint="A rare made-up word such as 'zxq' works best.")
    out = []
    for row in table or []:
        row = list(row)
        caption = str(row[CAPTION_COLUMN] or "").strip()
        if not has_trigger(caption, trigger):
            row[CAPTION_COLUMN] = f"{trigger}, {caption}" if caption else trigger
        out.append(row)
    return out


def replaced(table: list[list[Any]], find: str, replacement: str) -> tuple[list[list[Any]], int]:
    """The grid with ``find`` replaced in every caption, and the number of captions changed."""
    if not find:
        raise StudioError("Type the text to find first.")
    out, count = [], 0
    for row in table or []:
        row = list(row)
        caption = str(row[CAPTION_COLUMN] or "")
        if find in caption:
            row[CAPTION_COLUMN] = " ".join(caption.replace(find, replacement or "").split()).strip(" ,")
            count += 1
        out.append(row)
    return out, count


# --- layout and wiring ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetTab:
    """Components other tabs link to."""

    name: gr.Dropdown
    trigger: gr.Textbox


def build_dataset_tab(studio: Studio, demo: gr.Blocks) -> DatasetTab:
    gr.Markdown("Drop your pictures here, give each a caption, and fix what the check below reports. "
                "Everything is saved in the project folder as you go.", elem_id="dataset-intro")
    with gr.Row():
        names = studio.projects.list_datasets()
        name = gr.Dropdown(choices=names, value=names[0] if names else None, allow_custom_value=True,
                           label="Dataset", info="Pick a dataset, or type a new name and press Enter.",
                           elem_id="dataset-name", scale=3)
        trigger = gr.Textbox(label="Trigger word", info="A rare word the LoRA's subject will answer to, e.g. 'zxq'.",
                             elem_id="dataset-trigger", scale=2)
        resolution = gr.Number(value=DEFAULT_LINT_RESOLUTION, precision=0, label="Check against resolution (px)",
                               info="Pictures smaller than this are flagged (the demo model trains at 64).",
                               elem_id="dataset-resolution", scale=2)
    with gr.Row():
        # No file_types filter: one stray file in a dropped batch is skipped with a reason, not the whole batch.
        upload = gr.File(file_count="multiple", type="filepath",
                         label="Drop pictures (and .txt captions) here, or click to choose files",
                         elem_id="dataset-upload", elem_classes="ls-upload", height=140, scale=3)
        with gr.Column(scale=2):
            folder = gr.Textbox(label="…or copy in a folder from this computer", placeholder="/home/me/Pictures/zxq",
                                elem_id="dataset-folder")
            import_button = gr.Button("Copy folder into the dataset", elem_id="dataset-import")
            examples_button = gr.Button("No pictures at hand? Add the example pictures", size="sm",
                                        elem_id="dataset-examples")
    status = gr.Markdown(elem_id="dataset-status")
    report = gr.Markdown(elem_id="dataset-report")
    with gr.Row():
        add_trigger = gr.Button("Add trigger word to all captions", elem_id="dataset-add-trigger", scale=1)
        find = gr.Textbox(label="Find in captions", elem_id="dataset-find", scale=2)
        replace_with = gr.Textbox(label="Replace with", elem_id="dataset-replace", scale=2)
        replace_button = gr.Button("Replace in all captions", elem_id="dataset-replace-button", scale=1)
        check = gr.Button("Check again", elem_id="dataset-check", scale=1)
        undo = gr.Button("Undo the last caption change", elem_id="dataset-undo", scale=1)
    with gr.Row():
        selected = gr.Textbox(label="Selected picture", info="Click a row in the grid to select it.",
                              interactive=False, elem_id="dataset-selected", scale=3)
        remove = gr.Button("Remove selected picture", variant="stop", elem_id="dataset-remove", scale=1)
    table = gr.Dataframe(headers=TABLE_HEADERS, datatype=["markdown", "str", "str", "markdown"], type="array",
                         interactive=True, static_columns=[0, 1, 3], column_widths=["110px", "16%", "42%", "32%"],
                         wrap=True, max_height=720, label="Pictures and captions (edits are saved as .txt files)",
                         elem_id="dataset-table", row_count=0)
    issues = gr.Dataframe(headers=ISSUE_HEADERS, datatype=["str", "str", "str", "str"], type="array",
                          interactive=False, wrap=True, column_widths=["6%", "18%", "40%", "36%"],
                          label="Problems found, with what to do", elem_id="dataset-issues", row_count=0)

    view_outputs = [table, report, issues]

    def show(view: DatasetView, message: str = "") -> tuple:
        return view.table, view.report, view.issues, message

    @user_errors
    def show_dataset(dataset: str, trigger_word: str, check_resolution: float):
        return show(dataset_view(studio, dataset, trigger_word, check_resolution))

    @user_errors
    def open_dataset(dataset: str, typed: str, check_resolution: float):
        """A dataset picked (or typed): its remembered trigger word comes back with it (a new one keeps the box's)."""
        word = remembered_trigger(studio.projects, dataset) or typed
        remember_dataset(studio.projects, dataset)
        # The box is only written when the word changes: an answer arriving late must not undo a word typed since.
        return (*show(dataset_view(studio, dataset, word, check_resolution)), word if word != typed else gr.skip())

    @user_errors
    def reopen(shown: str | None, typed_word: str | None, check_resolution: float):
        """On page load: the dataset list as it is now, the dataset opened last and its trigger word
        (what the artist typed before the page finished loading is kept)."""
        dataset = str(shown or "").strip() or last_dataset(studio.projects)
        word = (str(typed_word or "").strip() or remembered_trigger(studio.projects, dataset) or "") if dataset else ""
        return (gr.update(choices=studio.projects.list_datasets(), value=dataset),
                *show(dataset_view(studio, dataset or "", word, check_resolution)), word)

    def keep_trigger(dataset: str, word: str) -> None:
        remember_trigger(studio.projects, dataset, word)

    @user_errors
    def upload_images(dataset: str, files: list[str] | None, trigger_word: str, check_resolution: float):
        if not str(dataset or "").strip():
            raise DatasetError("Name the dataset first.",
                               hint="Type a name in the Dataset box, then drop the pictures again.")
        if not files:
            raise DatasetError("No files were received.", hint="Drop pictures onto the upload area.")
        lint_resolution(check_resolution)  # before any file is stored: a refused upload leaves nothing behind
        summary = studio.projects.add_files(dataset, [Path(f) for f in files])
        return (*show(dataset_view(studio, dataset, trigger_word, check_resolution), summary.text()),
                gr.update(choices=studio.projects.list_datasets(), value=safe_name(dataset, "dataset name")), None)

    @user_errors
    def import_folder(dataset: str, source_folder: str, trigger_word: str, check_resolution: float):
        if not str(dataset or "").strip():
            raise DatasetError("Name the dataset first.", hint="Type a name in the Dataset box.")
        summary = studio.projects.import_folder(dataset, source_folder)
        return (*show(dataset_view(studio, dataset, trigger_word, check_resolution), summary.text()),
                gr.update(choices=studio.projects.list_datasets(), value=safe_name(dataset, "dataset name")))

    @user_errors
    def add_examples(dataset: str, trigger_word: str, check_resolution: float):
        dataset = str(dataset or "").strip() or EXAMPLE_DATASET
        summary = studio.projects.add_example_pictures(dataset)
        return (*show(dataset_view(studio, dataset, trigger_word, check_resolution), summary.text()),
                gr.update(choices=studio.projects.list_datasets(), value=safe_name(dataset, "dataset name")))

    @user_errors
    def save_caption_edits(dataset: str, rows: list[list[Any]], trigger_word: str, check_resolution: float):
        changed = save_captions(studio, dataset, rows)
        view = dataset_view(studio, dataset, trigger_word, check_resolution)
        message = f"Saved {changed} caption{'s' * (changed != 1)}." if changed else gr.skip()
        # The grid is redrawn only when its Problems column changed (a caption added or emptied):
        # redrawing on every edit would throw away a cell the artist has started typing in.
        stale = [row[-1] for row in rows or []] != [row[-1] for row in view.table]
        return view.table if stale else gr.skip(), view.report, view.issues, message

    @user_errors
    def add_trigger_to_all(dataset: str, rows: list[list[Any]], trigger_word: str, check_resolution: float):
        changed = save_captions(studio, dataset, with_trigger(rows, trigger_word),
                                f'Added the trigger word "{str(trigger_word).strip()}" to the captions')
        return show(dataset_view(studio, dataset, trigger_word, check_resolution),
                    f'Added "{trigger_word.strip()}" to {changed} caption{"s" * (changed != 1)}.')

    @user_errors
    def replace_in_captions(dataset: str, rows: list[list[Any]], find_text: str, replacement: str,
                            trigger_word: str, check_resolution: float):
        new_rows, count = replaced(rows, find_text, replacement)
        save_captions(studio, dataset, new_rows, f'Replaced "{find_text}" with "{replacement}" in the captions')
        return show(dataset_view(studio, dataset, trigger_word, check_resolution),
                    f'Replaced "{find_text}" in {count} caption{"s" * (count != 1)}.')

    @user_errors
    def undo_last_change(dataset: str, trigger_word: str, check_resolution: float):
        from trainer.data.captioning.autocaption import undo_last_captioning

        message = undo_last_captioning(studio.projects.dataset_dir(dataset))
        return show(dataset_view(studio, dataset, trigger_word, check_resolution), message)

    def select_row(rows: list[list[Any]], evt: gr.SelectData) -> str:
        row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
        return str(rows[row][FILE_COLUMN]) if rows and 0 <= row < len(rows) else ""

    @user_errors
    def remove_picture(dataset: str, file_name: str, trigger_word: str, check_resolution: float):
        if not str(file_name or "").strip():
            raise DatasetError("No picture is selected.", hint="Click its row in the grid first.")
        studio.projects.remove_file(dataset, file_name)
        return (*show(dataset_view(studio, dataset, trigger_word, check_resolution),
                      f"Removed {file_name} and its caption."), "")

    lint_inputs = [trigger, resolution]
    name.change(open_dataset, [name, trigger, resolution], [*view_outputs, status, trigger], api_name=False)
    check.click(show_dataset, [name, *lint_inputs], [*view_outputs, status], api_name="show_dataset")
    gr.on([trigger.submit, trigger.blur, add_trigger.click], keep_trigger, [name, trigger], None, api_name=False)
    demo.load(reopen, [name, trigger, resolution], [name, *view_outputs, status, trigger], api_name=False)
    resolution.submit(show_dataset, [name, *lint_inputs], [*view_outputs, status], api_name=False)
    trigger.submit(show_dataset, [name, *lint_inputs], [*view_outputs, status], api_name=False)
    upload.upload(upload_images, [name, upload, *lint_inputs], [*view_outputs, status, name, upload],
                  api_name="upload_images")
    import_button.click(import_folder, [name, folder, *lint_inputs], [*view_outputs, status, name],
                        api_name="import_folder")
    examples_button.click(add_examples, [name, *lint_inputs], [*view_outputs, status, name], api_name="add_examples")
    table.input(save_caption_edits, [name, table, *lint_inputs], [table, report, issues, status],
                api_name="save_captions",
                trigger_mode="always_last")
    table.select(select_row, [table], selected, api_name=False)
    remove.click(remove_picture, [name, selected, *lint_inputs], [*view_outputs, status, selected],
                 api_name="remove_picture")
    add_trigger.click(add_trigger_to_all, [name, table, *lint_inputs], [*view_outputs, status], api_name="add_trigger")
    replace_button.click(replace_in_captions, [name, table, find, replace_with, *lint_inputs],
                         [*view_outputs, status], api_name="replace_in_captions")
    undo.click(undo_last_change, [name, *lint_inputs], [*view_outputs, status], api_name="undo_caption_change")
    build_dataset_prep_panel(
        studio, name=name, trigger=trigger, lint_inputs=lint_inputs,
        refresh=lambda *args: show_dataset(*args)[:3], refresh_outputs=view_outputs,
        refresh_triggers=[name.change, check.click, trigger.submit, table.input, add_trigger.click,
                          replace_button.click, undo.click, upload.upload, import_button.click, examples_button.click])
    return DatasetTab(name=name, trigger=trigger)
