"""``lora-studio train`` and ``lora-studio presets``: training with a terminal progress bar.

Every config field is a flag (``--rank``, ``--te-lr``, ``--no-train-text-encoder``), built from
the config dataclasses so the two never drift apart. Settings are layered: defaults < ``--preset``
< ``--config`` < flags.
"""

from __future__ import annotations

import argparse
import os
import signal
import typing
from typing import Any, Literal

from trainer.cli.console import EXIT_USER_ERROR, format_size, quiet_libraries
from trainer.core.errors import StudioError


def register(sub: Any) -> None:
    train = sub.add_parser("train", help="Train a LoRA.", description="Train a LoRA. Settings: defaults < --preset < --config < flags.")
    train.add_argument("--preset", default=None, help="Preset name (see 'lora-studio presets') or .toml path. Default: character.")
    train.add_argument("--config", default=None, help="Run config .toml (same sections as 'lora-studio train --save-config').")
    train.add_argument("--save-config", default=None, metavar="PATH", help="Write the resolved config to PATH and exit.")
    train.add_argument("--check", action="store_true", help="Only check the dataset and settings; print the report and exit.")
    add_config_flags(train)
    train.set_defaults(handler=_run_train)

    presets = sub.add_parser("presets", help="List presets with the exact output file size for a base model.")
    presets.add_argument("--base", default="", help="Base model (default: the SD 1.5 architecture).")
    presets.add_argument("--base-config", default="", help=argparse.SUPPRESS)
    presets.set_defaults(handler=_run_presets)



def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per config field, named after it; defaults are None so only given flags override."""
    from trainer.config.schema import SECTIONS

    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(f"[{section}] settings")
        hints = typing.get_type_hints(cls)
        for f in cls.__dataclass_fields__.values():
            flag = "--" + f.name.replace("_", "-")
            hint = hints[f.name]
            help_text = f"{f.metadata.get('help', '')} (default: {f.default if f.default != '' else 'none'})"
            kwargs: dict[str, Any] = {"dest": f.name, "default": None, "help": help_text}
            if hint is bool:
                kwargs["action"] = argparse.BooleanOptionalAction
            elif typing.get_origin(hint) is Literal:
                kwargs["choices"] = typing.get_args(hint)
            elif typing.get_origin(hint) is tuple:
                kwargs["nargs"] = "+"
            elif hint in (int, float):
                kwargs["type"] = hint
            group.add_argument(flag, **kwargs)


def config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    from trainer.config.schema import field_index

    return {name: getattr(args, name) for name in field_index() if getattr(args, name, None) is not None}


def _run_train(args: argparse.Namespace) -> int:
    from trainer.config.presets import DEFAULT_PRESET, resolve_config
    from trainer.config.schema import save_toml

    preset = args.preset if args.preset is not None else (None if args.config else DEFAULT_PRESET)
    config = resolve_config(preset, args.config, config_overrides(args))
    if args.save_config:
        save_toml(config, args.save_config)
        print(f"wrote {args.save_config}")
        return 0
    if not config.data.data:
        raise StudioError("No dataset given.", hint="Pass --data FOLDER (images with .txt captions).")
    if not config.model.base:
        raise StudioError("No base model given.", hint="Pass --base with a diffusers folder, a .safetensors checkpoint or a hub id.")
    if args.check:
        return _print_check(config)
    return _train_with_progress_bar(config)


def _print_check(config) -> int:
    """The dataset report for this model and these settings, without training."""
    from trainer.config.validation import check_resolution_multiple
    from trainer.core.devices import check_training_precision, resolve_device
    from trainer.data.lint import lint_dataset
    from trainer.data.scan import scan_dataset
    from trainer.models.loading import load_base_model
    from trainer.models.text import check_clip_skip, count_tokens

    quiet_libraries()
    check_training_precision(config.train.precision, resolve_device(config.train.device, "train.device"),
                             "train.precision")
    model = load_base_model(config.model, supported=("sd1", "sd2", "sdxl"))
    check_clip_skip(model.name, model.text_encoders(), config.model.clip_skip, "model.clip_skip")
    resolution = config.data.resolution or model.native_resolution
    check_resolution_multiple(resolution, model.resolution_multiple)  # training would refuse it
    scan = scan_dataset(config.data)
    report = lint_dataset(scan, config.data, resolution, lambda caption: count_tokens(model.tokenizer, caption),
                          epochs=config.train.epochs, batch_size=config.train.batch_size, steps=config.train.steps,
                          bucket_step=model.resolution_multiple)
    print(report.summary_text(max_issues=50))
    return 0 if report.ok else EXIT_USER_ERROR


def _train_with_progress_bar(config) -> int:
    from tqdm import tqdm

    from trainer.train.events import (
        CheckpointSaved,
        LoraSaved,
        Notice,
        RunCommands,
        RunFinished,
        RunStarted,
        SamplesMade,
        StepProgress,
        ValidationMeasured,
    )
    from trainer.train.loop import train

    quiet_libraries()
    commands = RunCommands()

    def on_interrupt(signum, frame):  # first Ctrl-C: stop cleanly (checkpoint + export); second: abort
        if commands.stop_requested:
            raise KeyboardInterrupt
        commands.stop()
        tqdm.write("Stopping after this step (press Ctrl-C again to abort without saving)…")

    previous = signal.signal(signal.SIGINT, on_interrupt)
    bar = None
    reporting = os.environ.get("RANK", "0") == "0"  # under accelerate launch only the main process reports
    try:
        for event in train(config, commands):
            if not reporting:
                continue
            if isinstance(event, Notice):
                (tqdm.write if bar else print)(f"{'warning: ' if event.level == 'warning' else ''}{event.text}")
            elif isinstance(event, RunStarted):
                print(f"Training on {event.device}: {event.num_images} images, {event.total_steps} steps, "
                      f"{event.trainable_params:,} trainable parameters. Run folder: {event.run_dir}")
                bar = tqdm(total=event.total_steps, initial=event.start_step, unit="step", dynamic_ncols=True)
            elif isinstance(event, StepProgress):
                bar.update(event.step - bar.n)
                bar.set_postfix(loss=f"{event.smoothed_loss:.4f}", lr=f"{event.lr:.2e}", epoch=event.epoch)
            elif isinstance(event, SamplesMade):
                tqdm.write(f"samples at step {event.step}: {', '.join(str(p) for p in event.paths)}")
            elif isinstance(event, CheckpointSaved):
                tqdm.write(f"checkpoint: {event.path}")
            elif isinstance(event, LoraSaved):
                tqdm.write(f"epoch {event.epoch} LoRA (step {event.step}): {event.path}"
                           + "".join(f"; removed {p.name}" for p in event.removed))
            elif isinstance(event, ValidationMeasured):
                (tqdm.write if bar else print)(f"validation loss at step {event.step} (epoch {event.epoch}): {event.loss:.4f}")
            elif isinstance(event, RunFinished):
                if bar:
                    bar.close()
                state = "stopped early" if event.stopped_early else "done"
                print(f"{state} at step {event.step}: {event.output} ({format_size(event.size_bytes)})")
                for extra in event.extra_outputs:
                    print(f"also wrote {extra}")
                if event.stopped_early:
                    print("Resume with the same command plus --resume auto.")
    finally:
        signal.signal(signal.SIGINT, previous)
        if bar:
            bar.close()
    return 0


def _run_presets(args: argparse.Namespace) -> int:
    from trainer.lora.sizing import preset_sizes

    rows = preset_sizes(args.base or None, args.base_config or None)
    width = max(len(r.name) for r in rows)
    print(f"{'preset':<{width}}  {'rank':>4}  {'alpha':>5}  {'targets':<10}  {'TE':<3}  {'size':>9}  description")
    for r in rows:
        print(f"{r.name:<{width}}  {r.rank:>4}  {r.alpha:>5g}  {r.targets:<10}  {'yes' if r.text_encoder else 'no':<3}  "
              f"{format_size(r.size_bytes):>9}  {r.description}")
    print(f"(file sizes for {rows[0].base_label} at fp16, exact up to the few hundred bytes of run metadata)")
    return 0
