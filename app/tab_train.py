"""Train tab: choose data, base model and preset, see the plan, start, watch, stop, resume.

Training never runs in a handler. ``start_training`` resolves the config and queues it with the
studio's ``RunController``; ``watch_run`` is a generator that follows one run's state and streams
progress, loss curve, samples and the finished file to the page until the run ends. Closing the
tab only ends the watcher; a reloaded page attaches to the active run again (``attach``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from app.errors import user_errors
from app.projects import safe_name
from app.runs import RunState, resume_config, runs_on_disk
from app.settings_form import SettingsForm, build_settings_form
from app.studio import Studio
from trainer.config import StudioConfig
from trainer.errors import ConfigError, DatasetError, StudioError
from trainer.presets import DEFAULT_PRESET, list_presets, load_preset, resolve_config

WATCH_INTERVAL_S = 0.25  # at most four page updates a second, however fast the steps are
WATCH_HEARTBEAT_S = 10.0
RUN_HEADERS = ["Run", "Status", "Step", "Resumable from", "LoRA file"]
STATUS_LABELS = {
    "queued": "… queued", "preparing": "⚙ preparing", "training": "▶ training", "stopping": "■ stopping",
    "finished": "✔ finished", "stopped": "■ stopped", "failed": "✖ failed", "cancelled": "⊘ cancelled",
}


# --- handlers ------------------------------------------------------------------------------------


def run_config(studio: Studio, dataset: str, base: str, preset: str, run_name: str,
               overrides: dict[str, Any] | None) -> StudioConfig:
    """The validated config a Start would queue: preset ⊕ form overrides ⊕ the tab's pickers."""
    if not str(dataset or "").strip():
        raise DatasetError("No dataset is chosen.", hint="Pick one in the Dataset box (make one in the Dataset tab).")
    folder = studio.projects.dataset_dir(dataset)
    picked = {"base": studio.projects.resolve_base(base) if base else "", "data": str(folder),
              "output": str(studio.projects.run_output(run_name or "run"))}
    flat = {**(overrides or {}), **picked}
    flat.pop("resume", None)
    return resolve_config(preset or None, None, flat)


def check_base_exists(studio: Studio, base_choice: str) -> None:
    """A typed path that does not exist is reported now, not by the worker after a wait in the queue."""
    from trainer.errors import ModelLoadError
    from trainer.models import HUB_ID

    text = str(base_choice or "").strip()
    if studio.projects.is_demo(text) or Path(text).expanduser().exists():
        return
    if HUB_ID.match(text) and not text.startswith((".", "~", "/")):
        return
    raise ModelLoadError(f"Base model not found: {text}.",
                         hint="Type the full path of a diffusers folder or a .safetensors checkpoint, or pick the demo model.")


def unique_run_name(studio: Studio, wanted: str, dataset: str) -> str:
    """``wanted`` (or the dataset's name), numbered if a run of that name exists already."""
    base = safe_name(str(wanted or "").strip() or f"{dataset}-lora", "run name")
    name, n = base, 2
    runs = studio.projects.runs_dir
    while (runs / f"{name}.safetensors").exists() or (runs / f"{name}_run").exists():
        name, n = f"{base}-{n}", n + 1
    return name


def plan_markdown(studio: Studio, config: StudioConfig, base_choice: str) -> str:
    """What a run will do and produce, before it starts: steps math, exact file size, device."""
    from trainer.dataset import lint_dataset, scan_dataset
    from trainer.sizing import architecture_for, lora_size

    lines = []
    arch = None
    try:
        with studio.build_lock:
            arch = architecture_for(config.model.base, config.model.base_config or None)
    except StudioError as exc:
        size_line = f"**Output file size:** known once the base model can be read ({exc.message})"
    else:
        modules, size = lora_size(config, arch, config.output.export_dtype)
        size_line = (f"**Output file:** {Path(config.output.output).name}, {format_bytes(size)} "
                     f"({modules} layers, rank {config.network.rank}, {config.output.export_dtype}) for {arch.label}.")
    native = int(arch.unet.config.sample_size) * 8 if arch is not None else 512  # every SD VAE downsamples 8x
    resolution = config.data.resolution or native
    scan = scan_dataset(config.data)
    report = lint_dataset(scan, config.data, resolution, None, epochs=config.train.epochs,
                          batch_size=config.train.batch_size, steps=config.train.steps)
    if report.steps is not None:
        lines.append(f"**Steps:** {report.steps.text()} at {resolution} px.")
    if not report.ok:
        lines.append(f"✖ The dataset has {report.count('error')} error(s) at {resolution} px: see the Dataset tab.")
    lines.append(size_line)
    lines.append(estimate_line(studio, config, arch, report.steps.total_steps if report.steps else 0,
                               scan.num_samples, resolution))
    if studio.projects.is_demo(base_choice):
        lines.append("**Demo model:** tiny and random. It trains in seconds but its images are noise.")
    return "\n\n".join(lines)


def estimate_line(studio: Studio, config: StudioConfig, arch: Any, steps: int, samples: int, resolution: int) -> str:
    """Predicted memory and duration on the device the run will use."""
    device = device_label(config.train.device)
    try:
        from trainer.estimate import estimate_run
    except ImportError:  # an engine build without the estimator: say what we know
        return f"**Device:** {device}. The progress bar shows the measured speed and ETA from the first steps."
    if arch is None:
        return f"**Device:** {device}. Memory and time are estimated once the base model can be read."
    source = config.model.base if Path(config.model.base).is_dir() else arch.family
    with studio.build_lock:
        estimate = estimate_run(config, source, num_images=samples, resolution=resolution)
    memory = estimate.peak_memory_bytes + estimate.runtime_overhead_bytes
    kind = "GPU memory" if estimate.device.startswith("cuda") else "RAM"
    notes = "".join(f" {note}" for note in estimate.notes)
    return (f"**Estimate on {device}:** about {format_bytes(memory)} of {kind}, {format_duration(estimate.total_seconds)} "
            f"in all ({estimate.step_seconds:.2f} s per step × {estimate.total_steps or steps} steps, plus caching).{notes}")


def device_label(wanted: str) -> str:
    import torch

    if wanted.startswith("cuda") or (wanted == "auto" and torch.cuda.is_available()):
        if torch.cuda.is_available():
            index = int(wanted.split(":")[1]) if ":" in wanted else 0
            props = torch.cuda.get_device_properties(index)
            return f"{props.name} ({props.total_memory / 2**30:.0f} GB)"
        return f"{wanted} (not available here)"
    return "CPU (slow: fine for the demo model, hours for a real one)"


def format_bytes(size: float) -> str:
    for unit in ("bytes", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"


def format_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "—"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def progress_html(run: RunState | None) -> str:
    """The progress bar: step/total, speed, ETA, current loss."""
    if run is None:
        return ('<div class="ls-progress" data-status="idle"><div class="ls-progress-label">'
                'No run yet: choose a dataset and press Start.</div>'
                '<div class="ls-progress-track"><div class="ls-progress-fill" style="width:0%"></div></div></div>')
    total = max(run.total_steps, 1)
    fraction = min(run.step / total, 1.0) if run.total_steps else 0.0
    parts = [f"<b>{run.name}</b>", STATUS_LABELS.get(run.status, run.status)]
    if run.total_steps:
        parts.append(f"step {run.step} / {run.total_steps}")
    if run.start_step:
        parts.append(f"resumed from step {run.start_step}")
    if run.status in ("training", "stopping") and run.it_per_s:
        parts.append(f"{run.it_per_s:.2f} steps/s" if run.it_per_s >= 0.1 else f"{1 / run.it_per_s:.1f} s/step")
        parts.append(f"ETA {format_duration(run.eta_s)}")
    if run.loss is not None:
        parts.append(f"loss {run.loss:.4f}")
    label = " · ".join(parts)
    return (f'<div class="ls-progress" data-status="{run.status}" data-step="{run.step}" '
            f'data-total="{run.total_steps}"><div class="ls-progress-label" id="train-progress-label">{label}</div>'
            f'<div class="ls-progress-track"><div class="ls-progress-fill ls-{run.status}" '
            f'style="width:{fraction * 100:.1f}%"></div></div></div>')


def loss_frame(run: RunState | None) -> pd.DataFrame | None:
    """The loss curve; None until there is a first step (an empty frame would fix the plot's legend empty)."""
    if run is None or not run.losses:
        return None
    rows = []
    for step, loss, smoothed in run.losses:
        rows.append({"step": step, "loss": loss, "curve": "loss per step"})
        rows.append({"step": step, "loss": smoothed, "curve": "smoothed"})
    return pd.DataFrame(rows, columns=["step", "loss", "curve"]).astype({"step": "int64", "loss": "float64"})


def status_markdown(run: RunState | None) -> str:
    if run is None:
        return ""
    lines = []
    if run.status == "failed":
        lines.append(f"✖ **{run.error}**")
    elif run.status in ("finished", "stopped") and run.output is not None:
        verb = "Finished" if run.status == "finished" else f"Stopped at step {run.step} of {run.total_steps}"
        lines.append(f"✔ **{verb}:** `{run.output.name}` ({format_bytes(run.size_bytes)}) in `{run.output.parent}`")
        if run.status == "stopped" and run.checkpoints:
            lines.append(f"It can be resumed from step {run.checkpoints[-1][0]}: choose it under *Resume a run* below.")
    elif run.status == "queued":
        lines.append("… Waiting for the runs before it to finish.")
    if run.device and run.status in ("training", "stopping"):
        lines.append(f"Training on {run.device}: {run.num_images} pictures, {run.total_steps} steps.")
    if run.checkpoints and run.status not in ("finished",):
        lines.append(f"Last checkpoint: step {run.checkpoints[-1][0]}.")
    lines.extend(f"- {notice}" for notice in run.notices[-6:])
    return "\n\n".join(lines[:4]) + ("\n\n" + "\n".join(lines[4:]) if len(lines) > 4 else "")


def latest_runs(studio: Studio) -> list[RunState]:
    """This session's runs, newest first, one per name (a resumed run replaces its stopped attempt)."""
    seen: set[str] = set()
    latest = []
    for run in studio.runs.runs():
        if run.name not in seen:
            seen.add(run.name)
            latest.append(run)
    return latest


def runs_table(studio: Studio) -> list[list[str]]:
    """This session's runs, then earlier runs found on disk."""
    rows, seen = [], set()
    for run in latest_runs(studio):
        seen.add(run.name)
        rows.append([run.name, STATUS_LABELS.get(run.status, run.status), f"{run.step} / {run.total_steps or '?'}",
                     f"step {run.checkpoints[-1][0]}" if run.checkpoints and run.status != "finished" else "",
                     str(run.output) if run.output else ""])
    for record in runs_on_disk(studio.projects.runs_dir):
        if record.name in seen:
            continue
        rows.append([record.name, STATUS_LABELS.get(record.status, record.status),
                     f"{record.step} / {record.total_steps or '?'}",
                     f"step {record.last_checkpoint}" if record.resumable else "",
                     str(record.output) if record.output.is_file() else ""])
    return rows


def resumable_runs(studio: Studio) -> list[str]:
    active = {run.name for run in studio.runs.runs() if run.active}
    return [r.name for r in runs_on_disk(studio.projects.runs_dir) if r.resumable and r.name not in active]


def run_choices(studio: Studio) -> list[tuple[str, str]]:
    return [(f"{run.name} ({run.status})", run.id) for run in latest_runs(studio)]


# --- layout and wiring ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainTab:
    """Components other tabs link to."""

    dataset: gr.Dropdown
    trigger: gr.components.Component
    output_path: gr.Textbox
    output_base: gr.Textbox
    open_in_generate: gr.Button


def build_train_tab(studio: Studio, demo: gr.Blocks) -> TrainTab:
    presets = {p.name: p for p in list_presets()}
    default = resolve_config(DEFAULT_PRESET)
    datasets = studio.projects.list_datasets()
    with gr.Row():
        dataset = gr.Dropdown(choices=datasets, value=datasets[0] if datasets else None, label="Dataset",
                              allow_custom_value=True,
                              info="Made in the Dataset tab.", elem_id="train-dataset", scale=2)
        base = gr.Dropdown(choices=studio.projects.base_model_choices(), value=None, allow_custom_value=True,
                           label="Base model",
                           info="The demo model, or type the path of a diffusers folder or .safetensors checkpoint "
                                "(or a hub id when online).", elem_id="train-base", scale=3)
        preset = gr.Dropdown(choices=list(presets), value=DEFAULT_PRESET, label="Preset", allow_custom_value=True,
                             info="A starting point; every setting below stays editable.", elem_id="train-preset",
                             scale=2)
        run_name = gr.Textbox(label="Run name", info="Names the LoRA file (empty: the dataset's name).",
                              elem_id="train-run-name", scale=2)
    preset_info = gr.Markdown(presets[DEFAULT_PRESET].description, elem_id="train-preset-info")
    form: SettingsForm = build_settings_form(default)
    overrides = gr.JSON(value={}, visible=False, elem_id="train-overrides")
    with gr.Row():
        check = gr.Button("Check plan", elem_id="train-check", scale=1)
        start = gr.Button("Start training", variant="primary", elem_id="train-start", scale=2)
    plan = gr.Markdown(elem_id="train-plan")

    gr.Markdown("### Progress")
    with gr.Row():
        run_select = gr.Dropdown(choices=run_choices(studio), value=None, label="Showing run", allow_custom_value=True,
                                 elem_id="train-run-select", scale=3)
        stop = gr.Button("Stop", variant="stop", elem_id="train-stop", scale=1)
        save_now = gr.Button("Save checkpoint now", elem_id="train-save-now", scale=1)
        sample_now = gr.Button("Make samples now", elem_id="train-sample-now", scale=1)
    progress = gr.HTML(progress_html(None), elem_id="train-progress")
    status = gr.Markdown(elem_id="train-status")
    with gr.Row():
        loss_plot = gr.LinePlot(loss_frame(None), x="step", y="loss", color="curve", title="Training loss",
                                x_title="step", y_title="loss", height=300, elem_id="train-loss-plot", scale=3)
        samples = gr.Gallery(label="Sample images (newest first)", columns=3, height=300, elem_id="train-samples",
                             scale=2, object_fit="contain")
    with gr.Row():
        output_file = gr.File(label="The trained LoRA", interactive=False, elem_id="train-output-file", scale=3)
        open_in_generate = gr.Button("Open in Generate", elem_id="train-open-generate", scale=1, interactive=False)
    output_path = gr.Textbox(visible=False, elem_id="train-output-path")
    output_base = gr.Textbox(visible=False, elem_id="train-output-base")  # the base it was trained on

    with gr.Accordion("All runs, and resume a run", open=False, elem_id="train-runs-accordion"):
        runs = gr.Dataframe(headers=RUN_HEADERS, value=runs_table(studio), type="array", interactive=False,
                            wrap=True, elem_id="train-runs", row_count=0)
        with gr.Row():
            resume_select = gr.Dropdown(choices=resumable_runs(studio), value=None, label="Resume a run",
                                        allow_custom_value=True,
                                        info="Runs that stopped (or crashed) before their last step.",
                                        elem_id="train-resume-select", scale=3)
            resume = gr.Button("Resume", elem_id="train-resume", scale=1)
            refresh = gr.Button("Refresh list", elem_id="train-runs-refresh", scale=1)

    started = gr.Textbox(visible=False, elem_id="train-started-run")  # the id a Start or Resume returns
    watch_token = gr.State({"n": 0})
    form_inputs = set(form.components.values())

    # --- handlers (named inputs; the form arrives as a dict and is read by field name) ---

    @user_errors
    def collect_settings(values: dict[gr.components.Component, Any]) -> dict[str, Any]:
        return form.overrides(values)

    @user_errors
    def apply_preset(preset_name: str):
        config = resolve_config(preset_name)
        return {**form.updates(config), preset_info: load_preset(preset_name).description}

    @user_errors
    def check_training(dataset_name: str, base_model: str, preset_name: str, name: str, settings: dict[str, Any]) -> str:
        config = run_config(studio, dataset_name, base_model, preset_name, unique_run_name(studio, name, dataset_name),
                            settings)
        return plan_markdown(studio, config, base_model)

    @user_errors
    def start_training(dataset_name: str, base_model: str, preset_name: str, name: str, settings: dict[str, Any]):
        if not str(base_model or "").strip():
            raise ConfigError("No base model is chosen.",
                              hint="Pick the demo model to try things out, or type the path of your model.")
        check_base_exists(studio, base_model)
        final_name = unique_run_name(studio, name, dataset_name)
        config = run_config(studio, dataset_name, base_model, preset_name, final_name, settings)
        from trainer.dataset import scan_dataset

        scan_dataset(config.data)  # "no pictures" is reported now, not after the model has loaded
        run = studio.runs.submit(final_name, config)
        return run.id, plan_markdown(studio, config, base_model), runs_table(studio)

    @user_errors
    def watch_run(run_id: str, token: dict):
        """Stream one run's progress until it ends (or another run is chosen in this page)."""
        token["n"] += 1
        mine = token["n"]
        if not run_id:
            yield empty_view()
            return
        shown: dict[str, Any] = {}
        seen = -1
        while token["n"] == mine:
            run = studio.runs.wait_for_change(run_id, seen, WATCH_HEARTBEAT_S)
            if run.version != seen:
                seen = run.version
                yield run_view(run, shown)
            if not run.active:
                return
            time.sleep(WATCH_INTERVAL_S)

    def empty_view() -> dict:
        return {progress: progress_html(None), status: "", loss_plot: loss_frame(None), samples: [],
                output_file: None, output_path: "", output_base: "", open_in_generate: gr.update(interactive=False)}

    def run_view(run: RunState, shown: dict[str, Any]) -> dict:
        """Updates for the parts of the page that changed since the last yield."""
        update: dict = {progress: progress_html(run), status: status_markdown(run)}
        if shown.get("losses") != len(run.losses):
            shown["losses"] = len(run.losses)
            update[loss_plot] = loss_frame(run)
        if shown.get("samples") != len(run.samples):
            shown["samples"] = len(run.samples)
            update[samples] = [(str(path), caption) for path, caption in reversed(run.samples)]
        finished = run.output is not None and run.output.is_file() and not run.active
        if shown.get("finished") != finished:
            shown["finished"] = finished
            update[output_file] = str(run.output) if finished else None
            update[output_path] = str(run.output) if finished else ""
            update[output_base] = studio.projects.base_choice_for(run.config.model.base) if finished else ""
            update[open_in_generate] = gr.update(interactive=finished)
        if shown.get("status") != run.status:
            shown["status"] = run.status
            update[runs] = runs_table(studio)
            update[resume_select] = gr.update(choices=resumable_runs(studio))
            update[run_select] = gr.update(choices=run_choices(studio))
        return update

    @user_errors
    def stop_training(run_id: str) -> str:
        run = studio.runs.stop(_require_run(run_id))
        return status_markdown(run) or "Stopping after the current step; a checkpoint is saved and the LoRA exported."

    @user_errors
    def save_checkpoint_now(run_id: str) -> str:
        return status_markdown(studio.runs.save_now(_require_run(run_id)))

    @user_errors
    def make_samples_now(run_id: str) -> str:
        return status_markdown(studio.runs.sample_now(_require_run(run_id)))

    @user_errors
    def resume_training(name: str):
        if not name:
            raise StudioError("Choose a run to resume first.", hint="Only runs that stopped before their last step are listed.")
        run = studio.runs.submit(name, resume_config(studio.projects.runs_dir, name))
        return run.id, runs_table(studio)

    def show_run(run_id: str):
        return gr.update(choices=run_choices(studio), value=run_id or None)

    @user_errors
    def refresh_runs():
        return runs_table(studio), gr.update(choices=resumable_runs(studio)), gr.update(choices=run_choices(studio))

    @user_errors
    def attach():
        """On page load: show the run that is training (or the newest one), and current lists."""
        active = studio.runs.active_run()
        latest = studio.runs.runs()
        chosen = active.id if active else (latest[0].id if latest else None)
        return (gr.update(choices=run_choices(studio), value=chosen),
                gr.update(choices=studio.projects.list_datasets()),
                gr.update(choices=studio.projects.base_model_choices()),
                runs_table(studio), gr.update(choices=resumable_runs(studio)))

    # --- wiring ---

    preset.change(apply_preset, [preset], [*form.components.values(), preset_info], api_name="preset_settings")
    check.click(collect_settings, form_inputs, overrides, api_name=False).success(
        check_training, [dataset, base, preset, run_name, overrides], plan, api_name="check_training")
    start.click(collect_settings, form_inputs, overrides, api_name=False).success(
        start_training, [dataset, base, preset, run_name, overrides], [started, plan, runs],
        api_name="start_training").success(show_run, started, run_select, api_name=False)
    run_select.change(watch_run, [run_select, watch_token],
                      [progress, status, loss_plot, samples, output_file, output_path, output_base, open_in_generate, runs,
                       resume_select, run_select],
                      api_name="watch_run", concurrency_limit=None, show_progress="hidden")
    stop.click(stop_training, [run_select], status, api_name="stop_training", concurrency_limit=None)
    save_now.click(save_checkpoint_now, [run_select], status, api_name="save_checkpoint_now", concurrency_limit=None)
    sample_now.click(make_samples_now, [run_select], status, api_name="make_samples_now", concurrency_limit=None)
    resume.click(resume_training, [resume_select], [started, runs], api_name="resume_training").success(
        show_run, started, run_select, api_name=False)
    refresh.click(refresh_runs, None, [runs, resume_select, run_select], api_name="list_runs")
    demo.load(attach, None, [run_select, dataset, base, runs, resume_select], api_name=False)
    return TrainTab(dataset=dataset, trigger=form.components["trigger"], output_path=output_path,
                    output_base=output_base, open_in_generate=open_in_generate)


def _require_run(run_id: str) -> str:
    if not run_id:
        raise StudioError("No run is selected.", hint="Start a run, or pick one under 'Showing run'.")
    return str(run_id)
