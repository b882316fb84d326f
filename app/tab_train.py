"""Train tab: choose data, base model and preset, see the plan, start, watch, stop, resume.

Training never runs in a handler. ``start_training`` resolves the config and queues it with the
studio's ``RunController``; ``watch_run`` is a generator that follows one run's state and streams
progress, loss curve, samples and the finished file to the page until the run ends. Closing the
tab only ends the watcher; a reloaded page attaches to the active run again (``attach``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import gradio as gr

from app.epoch_panel import build_epoch_panel, build_prompt_rows
from app.errors import user_errors
from app.run_plan import check_base_exists, plan_markdown, run_config, unique_run_name
from app.run_records import resume_config
from app.run_view import (
    RUN_HEADERS,
    loss_frame,
    progress_html,
    resumable_runs,
    run_choices,
    runs_table,
    status_markdown,
)
from app.runs import RunState
from app.settings_form import SettingsForm, build_settings_form
from app.studio import Studio
from trainer.config.presets import (
    DEFAULT_PRESET,
    list_presets,
    load_preset,
    resolve_config,
)
from trainer.core.errors import ConfigError, StudioError

WATCH_INTERVAL_S = 0.25  # at most four page updates a second, however fast the steps are
WATCH_HEARTBEAT_S = 10.0
# The loss plot is redrawn from scratch by the browser on every update; on a CPU busy training, a
# redraw four times a second never finishes, so the curve follows at a calmer pace.
PLOT_INTERVAL_S = 2.0


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
    build_prompt_rows(studio, dataset, form.components["trigger"], form.components["sample_prompts"])
    overrides = gr.JSON(value={}, visible=False, elem_id="train-overrides")
    with gr.Row():
        check = gr.Button("Check plan", elem_id="train-check", scale=1)
        start = gr.Button("Start training", variant="primary", elem_id="train-start", scale=2)
    plan = gr.Markdown(elem_id="train-plan")

    gr.Markdown("### Progress", elem_id="train-progress-heading")
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
    build_epoch_panel(studio, output_path, run_select)

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
    def check_training(dataset_name: str, base_model: str, preset_name: str, name: str,
                       settings: dict[str, Any]) -> str:
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
        from trainer.data.scan import scan_dataset

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
        plot_due = time.monotonic() - shown.get("plotted_at", 0.0) >= PLOT_INTERVAL_S or not run.active
        points = (len(run.losses), len(run.val_losses))  # a validation loss can come after the last step
        if shown.get("losses") != points and plot_due:
            shown["losses"], shown["plotted_at"] = points, time.monotonic()
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
            raise StudioError("Choose a run to resume first.",
                              hint="Only runs that stopped before their last step are listed.")
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
                      [progress, status, loss_plot, samples, output_file, output_path, output_base, open_in_generate,
                       runs, resume_select, run_select],
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
