"""Tools tab: inspect, resize, merge and bake LoRA files (thin wrappers over ``trainer.tools``).

Files come from this app's runs, from ``loras/`` (uploaded here or in Generate) or from any
path typed in; results are written to the project's ``outputs/`` folder and offered for download.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from app.errors import user_errors
from app.studio import Studio
from app.tab_generate import lora_choices, resolve_lora_path
from trainer.core.errors import ConfigError, StudioError


@dataclass(frozen=True)
class WeightedFiles:
    """Files picked in a multi-select plus their weights typed as "0.7, 0.3"."""

    paths: list[Path]
    weights: list[float]


def weighted_files(studio: Studio, files: list[str] | None, weights_text: str) -> WeightedFiles:
    paths = [resolve_lora_path(studio, f) for f in (files or [])]
    if not paths:
        raise ConfigError("Choose at least one LoRA file.", hint="Pick files from the list or upload them above.")
    text = str(weights_text or "").strip()
    try:
        weights = [float(w) for w in text.replace(";", ",").split(",") if w.strip()] if text else []
    except ValueError:
        raise ConfigError(f"Cannot read the weights {text!r}.",
                          hint="Type numbers separated by commas, e.g. 0.7, 0.3.") from None
    if not weights:
        weights = [1.0] * len(paths)
    if len(weights) != len(paths):
        raise ConfigError(f"{len(paths)} files but {len(weights)} weights.",
                          hint="Give one weight per file, in the order the files are listed.")
    return WeightedFiles(paths, weights)


def output_name(studio: Studio, wanted: str, default_stem: str, suffix: str = ".safetensors") -> Path:
    stem = Path(str(wanted or "").strip() or default_stem).stem
    return studio.projects.new_output_path(stem, suffix)


@dataclass(frozen=True)
class ToolsTab:
    """What the page refreshes when the tab is opened (new runs, uploads)."""

    pickers: list[gr.components.Component]
    base: gr.Dropdown

    def refreshed(self, studio: Studio) -> list[Any]:
        return [*[gr.update(choices=lora_choices(studio)) for _ in self.pickers],
                gr.update(choices=studio.projects.base_model_choices())]


def build_tools_tab(studio: Studio) -> ToolsTab:
    from trainer.tools.bake import bake_loras
    from trainer.tools.inspect import inspect_lora
    from trainer.tools.resize import merge_loras, resize_lora

    gr.Markdown("Look inside a LoRA, make it smaller, mix several into one, or bake them into a checkpoint. "
                f"Results are saved in `{studio.projects.outputs_dir}`; baked checkpoints go to "
                f"`{studio.projects.models_dir}`, with the base models.", elem_id="tools-intro")
    with gr.Row():
        uploads = gr.File(file_count="multiple", file_types=[".safetensors"], type="filepath",
                          label="Upload LoRA files to use here (.safetensors)", elem_id="tools-upload",
                          elem_classes="ls-upload", height=140, scale=3)
        refresh = gr.Button("Refresh file lists", elem_id="tools-refresh", scale=1)
    status = gr.Markdown(elem_id="tools-status")

    with gr.Tab("Inspect", elem_id="tools-inspect-tab"):
        with gr.Row():
            inspect_file = gr.Dropdown(choices=lora_choices(studio), allow_custom_value=True, label="LoRA file",
                                       elem_id="tools-inspect-file", scale=4)
            inspect_button = gr.Button("Inspect", variant="primary", elem_id="tools-inspect-run", scale=1)
        with gr.Row():
            inspect_text = gr.Textbox(label="Summary", lines=16, elem_id="tools-inspect-summary", scale=2,
                                      buttons=["copy"])
            inspect_plot = gr.Image(label="Per-layer strength and singular-value spectrum", type="filepath",
                                    interactive=False, elem_id="tools-inspect-plot", scale=3)

    with gr.Tab("Resize", elem_id="tools-resize-tab"):
        with gr.Row():
            resize_file = gr.Dropdown(choices=lora_choices(studio), allow_custom_value=True, label="LoRA file",
                                      elem_id="tools-resize-file", scale=3)
            resize_rank = gr.Number(value=8, precision=0, label="New rank",
                                    info="Each layer keeps at most this rank (empty: decided by energy).",
                                    elem_id="tools-resize-rank")
            resize_energy = gr.Number(value=None, label="…or energy to keep (0–1)",
                                      info="e.g. 0.99: each layer gets the smallest rank keeping 99%.",
                                      elem_id="tools-resize-energy")
            resize_name = gr.Textbox(label="Output name", placeholder="mylora-r8", elem_id="tools-resize-name")
        resize_button = gr.Button("Resize", variant="primary", elem_id="tools-resize-run")
        with gr.Row():
            resize_text = gr.Textbox(label="Result", lines=6, elem_id="tools-resize-summary", scale=2)
            resize_out = gr.File(label="Resized LoRA", interactive=False, elem_id="tools-resize-output", scale=1)

    with gr.Tab("Merge", elem_id="tools-merge-tab"):
        with gr.Row():
            merge_files = gr.Dropdown(choices=lora_choices(studio), multiselect=True, allow_custom_value=True,
                                      label="LoRA files to merge", elem_id="tools-merge-files", scale=3)
            merge_weights = gr.Textbox(label="Weights", placeholder="0.7, 0.3",
                                       info="One per file, in order (empty: 1 each).", elem_id="tools-merge-weights")
            merge_rank = gr.Number(value=None, precision=0, label="Rank (optional)",
                                   info="Empty: exact merge (ranks add up). A number: SVD down to it.",
                                   elem_id="tools-merge-rank")
            merge_name = gr.Textbox(label="Output name", placeholder="merged", elem_id="tools-merge-name")
        merge_button = gr.Button("Merge", variant="primary", elem_id="tools-merge-run")
        with gr.Row():
            merge_text = gr.Textbox(label="Result", lines=6, elem_id="tools-merge-summary", scale=2)
            merge_out = gr.File(label="Merged LoRA", interactive=False, elem_id="tools-merge-output", scale=1)

    with gr.Tab("Bake into checkpoint", elem_id="tools-bake-tab"):
        with gr.Row():
            bake_base = gr.Dropdown(choices=studio.projects.base_model_choices(), allow_custom_value=True,
                                    label="Base model", elem_id="tools-bake-base", scale=3)
            bake_files = gr.Dropdown(choices=lora_choices(studio), multiselect=True, allow_custom_value=True,
                                     label="LoRA files", elem_id="tools-bake-files", scale=3)
            bake_weights = gr.Textbox(label="Weights", placeholder="1.0", info="One per file (empty: 1 each).",
                                      elem_id="tools-bake-weights")
            bake_name = gr.Textbox(label="Output name", placeholder="my-model", elem_id="tools-bake-name")
        bake_button = gr.Button("Bake", variant="primary", elem_id="tools-bake-run")
        with gr.Row():
            bake_text = gr.Textbox(label="Result", lines=6, elem_id="tools-bake-summary", scale=2)
            bake_out = gr.File(label="Checkpoint", interactive=False, elem_id="tools-bake-output", scale=1)

    pickers = [inspect_file, resize_file, merge_files, bake_files]
    tab = ToolsTab(pickers, bake_base)

    def refreshed_lists() -> list[Any]:
        return tab.refreshed(studio)[:-1]

    @user_errors
    def upload_loras(files: list[str] | None):
        if not files:
            raise StudioError("No files were received.", hint="Drop .safetensors LoRA files onto the upload area.")
        stored = [studio.projects.store_lora_upload(f) for f in files]
        names = ", ".join(p.name for p in stored)
        return (*refreshed_lists(), f"Added {names} to `{studio.projects.loras_dir}`.", None)

    @user_errors
    def inspect(file: str):
        path = resolve_lora_path(studio, str(file or ""))
        plot = studio.projects.new_output_path(f"{path.stem}-inspect", ".png")
        report = inspect_lora(path, plot=plot)
        return report.text(), str(plot)

    @user_errors
    def resize(file: str, rank: float | None, energy: float | None, name: str):
        path = resolve_lora_path(studio, str(file or ""))
        rank_value = int(rank) if rank else None
        energy_value = float(energy) if energy else None
        out = output_name(studio, name, f"{path.stem}-r{rank_value or 'auto'}")
        report = resize_lora(path, out, rank=rank_value, energy=energy_value)
        return report.text(), str(report.path)

    @user_errors
    def merge(files: list[str] | None, weights: str, rank: float | None, name: str):
        chosen = weighted_files(studio, files, weights)
        out = output_name(studio, name, "merged")
        report = merge_loras(list(zip(chosen.paths, chosen.weights, strict=True)), out,
                             rank=int(rank) if rank else None)
        return report.text(), str(report.path)

    @user_errors
    def bake(base: str, files: list[str] | None, weights: str, name: str, progress: gr.Progress = gr.Progress()):
        from trainer.generate.requests import LoraSpec

        chosen = weighted_files(studio, files, weights)
        base_path = studio.projects.resolve_base(base)
        # Into models/: a baked checkpoint is a base model (listed with them, never with the LoRAs).
        out = studio.projects.new_model_path(Path(str(name or "").strip() or f"{Path(base_path).stem}-baked").stem)
        progress(0.1, desc="Loading the base model and adding the LoRAs…")
        with studio.build_lock:
            report = bake_loras(base_path, [LoraSpec(p, w) for p, w in zip(chosen.paths, chosen.weights, strict=True)],
                                out)
        return report.text(), str(report.path)

    gpu = dict(concurrency_id="gpu", concurrency_limit=1)
    uploads.upload(upload_loras, uploads, [*pickers, status, uploads], api_name="upload_loras")
    refresh.click(lambda: refreshed_lists(), None, pickers, api_name=False)
    inspect_button.click(inspect, inspect_file, [inspect_text, inspect_plot], api_name="inspect_lora", **gpu)
    resize_button.click(resize, [resize_file, resize_rank, resize_energy, resize_name], [resize_text, resize_out],
                        api_name="resize_lora", **gpu)
    merge_button.click(merge, [merge_files, merge_weights, merge_rank, merge_name], [merge_text, merge_out],
                       api_name="merge_loras", **gpu)
    bake_button.click(bake, [bake_base, bake_files, bake_weights, bake_name], [bake_text, bake_out],
                      api_name="bake_checkpoint", **gpu)
    return tab
