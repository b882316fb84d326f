"""Train tab: choose data, base model and preset, see the plan, start, watch, stop, resume.

Training never runs in a handler. ``start_training`` resolves the config and queues it with the
studio's ``RunController``; ``watch_run`` is a generator that follows one run's state and streams
progress, loss curve, samples and the finished file to the page until the run ends. Closing the
tab only ends the watcher; a reloaded page attaches to the active run again (``attach``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from app.epoch_panel import build_epoch_panel, build_prompt_rows
from app.errors import user_errors
from app.preset_switch import switch_preset, typed_fields
from app.run_plan import check_base_exists, plan_markdown, run_config, unique_run_name
from app.run_records import resume_config
from app.run_settings import (
    config_from_file,
    loaded_file_notes,
    pickers_for,
    settings_file,
)
from app.run_view import (
    RUN_HEADERS,
    format_bytes,
    loss_frame,
    progress_html,
    resumable_runs,
    run_choices,
    runs_table,
    status_markdown,
)
from app.runs import RunState
from app.settings_form import SettingsForm, build_settings_form, config_values
from app.studio import Studio
from trainer.config.presets import (
    DEFAULT_PRESET,
    list_presets,
    resolve_config,
)
from trainer.config.schema import StudioConfig
from trainer.core.errors import ConfigError, StudioError

WATCH_INTERVAL_S = 0.25  # at most four page updates a second, however fast the steps are
WATCH_HEARTBEAT_S = 10.0
# The loss plot is redrawn from scratch by the browser on every update; on a CPU busy training, a
# redraw four times a second never finishes, so the curve follows at a calmer pace.
PLOT_INTERVAL_S = 2.0
NO_OUTPUT_LABEL = "The trained LoRA appears here"


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
        run_name_box = gr.Textbox(label="Run name", info="Names the LoRA file (empty: the dataset's name).",
                              elem_id="train-run-name", scale=2)
    preset_info = gr.Markdown(presets[DEFAULT_PRESET].description, elem_id="train-preset-info")
    form: SettingsForm = build_settings_form(default)
    build_prompt_rows(studio, dataset, form.components["trigger"], form.components["sample_prompts"])
    overrides = gr.JSON(value={}, visible=False, elem_id="train-overrides")
    shown_settings = gr.JSON(value={}, visible=False, elem_id="train-shown-settings")  # the form before a preset change
    applied_preset = gr.State(DEFAULT_PRESET)  # the preset the form's untouched values come from
    with gr.Row():
        check = gr.Button("Check plan", elem_id="train-check", scale=1)
        start = gr.Button("Start training", variant="primary", elem_id="train-start", scale=2)
    plan = gr.Markdown(elem_id="train-plan")
    with gr.Accordion("Save or load these settings (config TOML)", open=False, elem_id="train-config-accordion"), \
            gr.Row():
        save_config = gr.Button("Save settings as TOML", elem_id="train-save-config", scale=1)
        load_config = gr.UploadButton("Load settings from a TOML file", file_types=[".toml"], type="filepath",
                                      elem_id="train-load-config", scale=1)
        config_file = gr.File(label="Settings file (for 'lora-studio train --config')", interactive=False,
                              elem_id="train-config-file", scale=2)

    gr.Markdown("### Progress", elem_id="train-progress-heading")
    with gr.Row():
        run_select = gr.Dropdown(choices=run_choices(studio), value=None, label="Showing run", allow_custom_value=True,
                                 elem_id="train-run-select", scale=3)
        stop = gr.Button("Stop", variant="stop", elem_id="train-stop", scale=1)
        save_now = gr.Button("Save checkpoint now", elem_id="train-save-now", scale=1)
        sample_now = gr.Button("Make samples now", elem_id="train-sample-now", scale=1)
        load_run_settings = gr.Button("Load settings from this run", elem_id="train-load-run-settings", scale=1)
    progress = gr.HTML(progress_html(None), elem_id="train-progress")
    status = gr.Markdown(elem_id="train-status")
    with gr.Row():
        loss_plot = gr.LinePlot(loss_frame(None), x="step", y="loss", color="curve", title="Training loss",
                                x_title="step", y_title="loss", height=300, elem_id="train-loss-plot", scale=3)
        samples = gr.Gallery(label="Sample images (newest first)", columns=3, height=300, elem_id="train-samples",
                             scale=2, object_fit="contain")
    with gr.Row():
        # A download button rather than gr.File: its label carries the size as the plan and the status
        # write it (gr.File prints its own, in KiB).
        output_file = gr.DownloadButton(NO_OUTPUT_LABEL, value=None, interactive=False, elem_id="train-output-file",
                                        scale=3)
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
    plotted = gr.State({})  # the run and the number of points the page's loss plot shows
    plot_timer = gr.Timer(PLOT_INTERVAL_S)
    form_inputs = set(form.components.values())

    # --- handlers (named inputs; the form arrives as a dict and is read by field name) ---

    @user_errors
    def collect_settings(values: dict[gr.components.Component, Any]) -> dict[str, Any]:
        return form.overrides(values)

    def form_now(values: dict[gr.components.Component, Any]) -> dict[str, Any]:
        """The form as shown, by field name, unchecked (a preset change must not fail on a half-typed box)."""
        return {name: values.get(component) for name, component in form.components.items()}

    @user_errors
    def apply_preset(preset_name: str, shown: dict[str, Any] | None, previous: str | None):
        """Move the settings the artist left as the previous preset had them; keep the ones they changed."""
        previous = previous or DEFAULT_PRESET
        if shown is not None and not isinstance(shown, dict):
            raise ConfigError(f"The settings shown must be a dict of setting names and values, not {shown!r:.60}.",
                              hint='Send the fields to keep, e.g. {"rank": 8}, or an empty dict.')
        current = {**config_values(resolve_config(previous)), **(shown or {})}  # an API call may send a few fields
        switch = switch_preset(previous, preset_name, current)
        updates = {component: switch.values[name] for name, component in form.components.items()}
        return {**updates, preset_info: switch.note(preset_name), applied_preset: preset_name}

    @user_errors
    def check_training(dataset_name: str, base_model: str, preset_name: str, name: str,
                       settings: dict[str, Any]) -> str:
        check_base_exists(studio, base_model)  # its inputs first: no plan for a model that is not there
        config = run_config(studio, dataset_name, base_model, preset_name, unique_run_name(studio, name, dataset_name),
                            settings)
        return plan_markdown(studio, config, base_model)

    @user_errors
    def start_training(dataset_name: str, base_model: str, preset_name: str, name: str, settings: dict[str, Any]):
        check_base_exists(studio, base_model)
        final_name = unique_run_name(studio, name, dataset_name)
        config = run_config(studio, dataset_name, base_model, preset_name, final_name, settings)
        from trainer.data.scan import scan_dataset

        scan_dataset(config.data)  # "no pictures" is reported now, not after the model has loaded
        plan = plan_markdown(studio, config, base_model)  # and the device, precision and clip skip
        run = studio.runs.submit(final_name, config)
        return run.id, plan, runs_table(studio)

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
        while True:
            run = studio.runs.wait_for_change(run_id, seen, WATCH_HEARTBEAT_S)
            if token["n"] != mine:
                # Another run was picked. End on an empty update: gradio applies a generator's last
                # output again when it ends, which would bring this run's view back over the new one.
                yield {progress: gr.skip()}
                return
            if run.version != seen:
                seen = run.version
                yield run_view(run, shown)
            if not run.active:
                return
            time.sleep(WATCH_INTERVAL_S)

    def empty_view() -> dict:
        return {progress: progress_html(None), status: "", samples: [],
                output_file: gr.update(value=None, label=NO_OUTPUT_LABEL, interactive=False), output_path: "", output_base: "", open_in_generate: gr.update(interactive=False),
                **control_labels(None)}

    def control_labels(run: RunState | None) -> dict:
        """Stop / Save / Sample name the run they act on (the one shown), and work only while it trains."""
        named = f" '{run.name}'" if run is not None else ""
        live = run is not None and run.status in ("preparing", "training")
        return {stop: gr.update(value=f"Stop{named}", interactive=run is not None and run.active),
                save_now: gr.update(value=f"Save checkpoint of{named} now" if run else "Save checkpoint now",
                                    interactive=live),
                sample_now: gr.update(value=f"Make samples of{named} now" if run else "Make samples now",
                                      interactive=live)}

    def run_view(run: RunState, shown: dict[str, Any]) -> dict:
        """Updates for the parts of the page that changed since the last yield. The progress, the
        status and the control buttons are sent every time: an update of an earlier watcher of this
        page arriving late (a run picked twice in a row) is put right by the next step."""
        update: dict = {progress: progress_html(run), status: status_markdown(run), **control_labels(run)}
        if shown.get("samples") != len(run.samples):
            shown["samples"] = len(run.samples)
            update[samples] = [(str(path), caption) for path, caption in reversed(run.samples)]
        finished = run.output is not None and run.output.is_file() and not run.active
        if shown.get("finished") != finished:
            shown["finished"] = finished
            update[output_file] = (gr.update(value=str(run.output), label=output_label(run), interactive=True) if finished
                                   else gr.update(value=None, label=NO_OUTPUT_LABEL, interactive=False))
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

    def settings_view(config: StudioConfig, run_name: str | None = None) -> dict:
        """The pickers and the form showing ``config``."""
        picked = pickers_for(studio.projects, config)
        update: dict = dict(form.updates(config))
        update[base] = gr.update(choices=studio.projects.base_model_choices(), value=picked.base or None)
        update[run_name_box] = run_name if run_name is not None else picked.run_name
        if picked.dataset:
            update[dataset] = gr.update(choices=studio.projects.list_datasets(), value=picked.dataset)
        return update

    @user_errors
    def attach():
        """On page load: show the run that is training (or the newest one), and current lists."""
        active = studio.runs.active_run()
        latest = studio.runs.runs()
        shown = active or (latest[0] if latest else None)
        return {run_select: gr.update(choices=run_choices(studio), value=shown.id if shown else None),
                dataset: gr.update(choices=studio.projects.list_datasets()),
                base: gr.update(choices=studio.projects.base_model_choices()),
                runs: runs_table(studio), resume_select: gr.update(choices=resumable_runs(studio))}

    @user_errors
    def settings_on_load(values: dict[gr.components.Component, Any]) -> dict:
        """Then the shown run's settings in the form, but not over what the artist typed or picked while
        the page loaded (read now, after the lists came: the load's own inputs were taken before)."""
        try:
            run = studio.runs.get(values.get(run_select)) if values.get(run_select) else None
        except StudioError:
            run = None
        if run is None:
            return {component: gr.skip() for component in settings_outputs}
        view = settings_view(run.config, run.name)
        for name in typed_fields(form_now(values), DEFAULT_PRESET):
            del view[form.components[name]]
        for picker in (dataset, base, run_name_box):
            if str(values.get(picker) or "").strip():
                view.pop(picker, None)
        return view

    @user_errors
    def plot_run(run_id: str, state: dict):
        """The shown run's loss plot, sent whole and only when it changed. Not part of the streaming
        watcher: gradio streams a generator's outputs as patches on the page's last value, and two
        watchers (a run picked while another streams) patching one plot broke it in the page."""
        try:
            run = studio.runs.get(run_id) if run_id else None
        except StudioError:  # a run of an earlier page state: nothing to plot
            run = None
        points = (run_id, len(run.losses), len(run.val_losses)) if run is not None else (run_id, 0, 0)
        if state.get("points") == list(points):
            return gr.skip(), state
        return loss_frame(run), {"points": list(points)}

    @user_errors
    def settings_of_run(run_id: str) -> dict:
        run = studio.runs.get(_require_run(run_id))
        return {**settings_view(run.config, run.name), plan: f"Loaded the settings of run **{run.name}**."}

    @user_errors
    def save_settings(dataset_name: str, base_model: str, preset_name: str, name: str, settings: dict[str, Any]):
        config = run_config(studio, dataset_name, base_model, preset_name, unique_run_name(studio, name, dataset_name),
                            settings)
        return str(settings_file(studio.projects, config))

    @user_errors
    def settings_from_file(path: str) -> dict:
        config = config_from_file(path)
        notes = "".join(f"\n\n⚠ {note}" for note in loaded_file_notes(studio.projects, config))
        return {**settings_view(config), plan: f"Loaded the settings of **{Path(path).name}**.{notes}"}

    # --- wiring ---

    preset.change(form_now, form_inputs, shown_settings, api_name=False).then(
        apply_preset, [preset, shown_settings, applied_preset], [*form.components.values(), preset_info, applied_preset],
        api_name="preset_settings")
    check.click(collect_settings, form_inputs, overrides, api_name=False).success(
        check_training, [dataset, base, preset, run_name_box, overrides], plan, api_name="check_training")
    start.click(collect_settings, form_inputs, overrides, api_name=False).success(
        start_training, [dataset, base, preset, run_name_box, overrides], [started, plan, runs],
        api_name="start_training").success(show_run, started, run_select, api_name=False)
    run_select.change(watch_run, [run_select, watch_token],
                      [progress, status, samples, output_file, output_path, output_base, open_in_generate,
                       runs, resume_select, run_select, stop, save_now, sample_now],
                      api_name="watch_run", concurrency_limit=None, show_progress="hidden",
                      # A change's default, "always_last", would start the new watcher only after the old
                      # one ends, i.e. when the run it follows finishes: the view kept showing the old run.
                      trigger_mode="multiple")
    for plot_event in (run_select.change, plot_timer.tick):
        plot_event(plot_run, [run_select, plotted], [loss_plot, plotted], api_name=False, show_progress="hidden",
                   concurrency_limit=None)
    stop.click(stop_training, [run_select], status, api_name="stop_training", concurrency_limit=None)
    save_now.click(save_checkpoint_now, [run_select], status, api_name="save_checkpoint_now", concurrency_limit=None)
    sample_now.click(make_samples_now, [run_select], status, api_name="make_samples_now", concurrency_limit=None)
    resume.click(resume_training, [resume_select], [started, runs], api_name="resume_training").success(
        show_run, started, run_select, api_name=False)
    refresh.click(refresh_runs, None, [runs, resume_select, run_select], api_name="list_runs")
    settings_outputs = [*form.components.values(), dataset, base, run_name_box]
    demo.load(attach, None, [run_select, runs, resume_select, dataset, base], api_name=False).then(
        settings_on_load, {*form_inputs, run_select, dataset, base, run_name_box}, settings_outputs, api_name=False)
    load_run_settings.click(settings_of_run, run_select, [*settings_outputs, plan], api_name="run_settings")
    save_config.click(collect_settings, form_inputs, overrides, api_name=False).success(
        save_settings, [dataset, base, preset, run_name_box, overrides], config_file, api_name="save_settings")
    load_config.upload(settings_from_file, load_config, [*settings_outputs, plan], api_name="load_settings")
    return TrainTab(dataset=dataset, trigger=form.components["trigger"], output_path=output_path,
                    output_base=output_base, open_in_generate=open_in_generate)


def output_label(run: RunState) -> str:
    """The download button's text: the file and its size, formatted as the plan and the status line do."""
    return f"⇣ Download {run.output.name} ({format_bytes(run.size_bytes)})"


def _require_run(run_id: str) -> str:
    if not run_id:
        raise StudioError("No run is selected.", hint="Start a run, or pick one under 'Showing run'.")
    return str(run_id)
