"""What a Start would do, worked out before anything trains: the config, the run name, the plan.

``run_config`` turns the Train tab's pickers and form into one validated ``StudioConfig``;
``plan_markdown`` shows the steps math, the output file size and the predicted memory and time
for the device the run will use, all from the engine (``trainer.data.scan``, ``trainer.data.lint``,
``trainer.lora.sizing``, ``trainer.train.estimate``) without loading any weights.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from app.projects import safe_name
from app.run_view import format_bytes, format_duration
from app.settings_form import on_screen_names
from app.studio import Studio
from trainer.config.presets import resolve_config
from trainer.config.schema import StudioConfig
from trainer.core.errors import ConfigError, DatasetError, StudioError

PATH_SETTINGS = ("base_config", "reg_data")  # settings that name a file or folder on the server


def run_config(studio: Studio, dataset: str, base: str, preset: str, run_name: str,
               overrides: dict[str, Any] | None) -> StudioConfig:
    """The validated config a Start would queue: preset ⊕ form overrides ⊕ the tab's pickers."""
    if not str(dataset or "").strip():
        raise DatasetError("No dataset is chosen.", hint="Pick one in the Dataset box (make one in the Dataset tab).")
    if overrides is not None and not isinstance(overrides, dict):
        raise ConfigError(f"The settings must be a dict of setting names and values, not {overrides!r:.60}.",
                          hint='Send them as the form does, e.g. {"rank": 8, "steps": 500}.')
    folder = studio.projects.dataset_dir(dataset)
    picked = {"base": studio.projects.resolve_base(base) if base else "", "data": str(folder),
              "output": str(studio.projects.run_output(run_name or "run"))}
    flat = {**(overrides or {}), **picked}
    if not flat.get("base_config"):  # a baked checkpoint knows its configs
        flat["base_config"] = studio.projects.base_config_for(picked["base"])
    flat.pop("resume", None)
    for key in PATH_SETTINGS:  # folders typed in the form follow the same rule as the pickers
        if str(flat.get(key) or "").strip():
            studio.projects.paths.check(str(flat[key]).strip(), key.replace("_", " "))
    try:
        return resolve_config(preset or None, None, flat)
    except ConfigError as exc:  # "optim.lr = -1.0 ..." reads "Learning rate (UNet)" = -1.0 on the page
        raise on_screen_names(exc) from None


def check_base_exists(studio: Studio, base_choice: str) -> None:
    """An empty choice or a typed path that does not exist is reported now, not by the worker after a
    wait in the queue (nor as a plan computed for no model at all)."""
    from trainer.core.errors import ModelLoadError
    from trainer.models.loading import HUB_ID

    text = str(base_choice or "").strip()
    if not text:
        raise ModelLoadError("No base model is chosen.",
                             hint="Pick the demo model to try things out, or type the path of your model.")
    if not studio.projects.is_demo(text):
        studio.projects.resolve_base(text)  # a path outside the allowed folders is refused before it is looked at
    if studio.projects.is_demo(text) or Path(text).expanduser().exists():
        return
    if HUB_ID.match(text) and not text.startswith((".", "~", "/")):
        return
    raise ModelLoadError(f"Base model not found: {text}.",
                         hint="Type the full path of a diffusers folder or a .safetensors checkpoint, "
                              "or pick the demo model.")


def unique_run_name(studio: Studio, wanted: str, dataset: str) -> str:
    """``wanted`` (or the dataset's name), numbered if a run of that name exists already."""
    base = safe_name(str(wanted or "").strip() or f"{dataset}-lora", "run name")
    name, n = base, 2
    runs = studio.projects.runs_dir
    while (runs / f"{name}.safetensors").exists() or (runs / f"{name}_run").exists():
        name, n = f"{base}-{n}", n + 1
    return name


def plan_markdown(studio: Studio, config: StudioConfig, base_choice: str) -> str:
    """What a run will do and produce, before it starts: steps math, exact file size, device.

    Its inputs are checked first, as a Start checks them: a device that is not here, or a
    precision it cannot run, is the plan's answer rather than a line about it."""
    from trainer.core.devices import check_training_precision, resolve_device
    from trainer.data.lint import lint_dataset
    from trainer.data.scan import scan_dataset
    from trainer.lora.sizing import architecture_for, lora_size
    from trainer.models.text import check_clip_skip
    from trainer.train.planned_size import planned_file_size

    check_training_precision(config.train.precision, resolve_device(config.train.device, "train.device"),
                             "train.precision")
    lines = []
    arch = None
    try:
        with studio.build_lock:
            arch = architecture_for(config.model.base, config.model.base_config or None)
    except StudioError as exc:
        size_error = exc.message
    if arch is not None:
        check_clip_skip(arch.label, arch.text_encoders.values(), config.model.clip_skip, "model.clip_skip")
    native = int(arch.unet.config.sample_size) * 8 if arch is not None else 512  # every SD VAE downsamples 8x
    resolution = config.data.resolution or native
    scan = scan_dataset(config.data)
    if arch is None:
        size_line = f"**Output file size:** known once the base model can be read ({size_error})"
    else:
        try:
            with studio.build_lock:  # the optimiser's class is built for its name in the header
                modules, size = planned_file_size(config, arch, scan, resolution)
        except DatasetError:  # no usable picture yet: the tensors are known, the header's dataset part is typical
            modules, size = lora_size(config, arch, config.output.export_dtype)
        size_line = (f"**Output file:** {Path(config.output.output).name}, {format_bytes(size)} "
                     f"({modules} layers, rank {config.network.rank}, {config.output.export_dtype}) for {arch.label}.")
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
    """Predicted memory and duration on the device the run will use (with gradient checkpointing
    where the run will turn it on because it would not fit without)."""
    from trainer.train.estimate import checkpointing_for_memory

    device = device_label(config.train.device)
    if arch is None:
        return f"**Device:** {device}. Memory and time are estimated once the base model can be read."
    source = config.model.base if Path(config.model.base).is_dir() else arch.family
    free = gpu_free_bytes(config.train.device)
    with studio.build_lock:
        estimator = studio.estimator(source)
        memory_plan = None if free is None else checkpointing_for_memory(estimator, config, free, resolution=resolution)
        if memory_plan is not None and memory_plan.checkpointing:
            config = replace(config, train=replace(config.train, grad_checkpointing=True))
        estimate = estimator.estimate(config, num_images=samples, resolution=resolution)
    memory = estimate.peak_memory_bytes + estimate.runtime_overhead_bytes
    kind = "GPU memory" if estimate.device.startswith("cuda") else "RAM"
    notes = "".join(f" {note}" for note in (*estimate.notes, memory_plan.notice if memory_plan else "") if note)
    return (f"**Estimate on {device}:** about {format_bytes(memory)} of {kind}, "
            f"{format_duration(estimate.total_seconds)} in all ({estimate.step_seconds:.2f} s per step × "
            f"{estimate.total_steps or steps} steps, plus caching).{notes}")


def gpu_free_bytes(wanted: str) -> int | None:
    """Free memory of the CUDA GPU a run on ``wanted`` would use; None when it trains elsewhere."""
    import torch

    if not torch.cuda.is_available() or not (wanted == "auto" or wanted.startswith("cuda")):
        return None
    free, _ = torch.cuda.mem_get_info(torch.device(wanted if wanted != "auto" else "cuda"))
    return free


def device_label(wanted: str) -> str:
    import torch

    if wanted.startswith("cuda") or (wanted == "auto" and torch.cuda.is_available()):
        if torch.cuda.is_available():
            index = int(wanted.split(":")[1]) if ":" in wanted else 0
            props = torch.cuda.get_device_properties(index)
            return f"{props.name} ({props.total_memory / 2**30:.0f} GB)"
        return f"{wanted} (not available here)"
    return "CPU (slow: fine for the demo model, hours for a real one)"
