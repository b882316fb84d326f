"""``lora-studio`` command line: a thin client of the engine's API, like the GUI.

``lora-studio`` alone starts the app; ``lora-studio train ...`` trains with a terminal
progress bar. Every config field is a flag (``--rank``, ``--te-lr``, ``--no-train-text-encoder``);
user errors end with one actionable line and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from trainer.errors import StudioError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130

Command = Callable[[argparse.Namespace], int]


class StudioArgumentParser(argparse.ArgumentParser):
    """argparse that takes any negative number as a value: ``--lr -1e-4``, ``--cfg -.5``, ``--seed -1``.

    Python < 3.14 only recognises ``-1`` and ``-1.5`` as numbers and reads ``-1e-4`` as an unknown
    option ("--lr: expected one argument"). This is CPython 3.14's own rule (gh-123945, gh-124321):
    a dash followed by a digit, or by a dot and a digit, is a value. Sub-commands inherit it, since
    ``add_subparsers`` builds them with the parser's own class.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"-\.?\d")


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Command = getattr(args, "handler", None) or _run_app
    try:
        return handler(args)
    except StudioError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def build_parser() -> argparse.ArgumentParser:
    parser = StudioArgumentParser(prog="lora-studio", description="Train and use Stable Diffusion LoRAs locally.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    app = sub.add_parser("app", help="Start the web app (the default with no command).")
    add_app_arguments(app)
    app.set_defaults(handler=_run_app)
    add_app_arguments(parser)

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

    for register in _extra_commands():
        register(sub)
    return parser


def add_app_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=int, default=7860, help="Port (the next free one is used if busy).")
    parser.add_argument("--listen", action="store_true", help="Bind to 0.0.0.0 so other machines can connect (use with --auth).")
    parser.add_argument("--auth", default=None, metavar="USER:PASS", help="Require a login.")
    parser.add_argument("--no-browser", action="store_true", help="Don't open a browser tab.")
    parser.add_argument("--projects", default=None, metavar="DIR", help="Where datasets and runs live (default: ~/LoRA-Studio).")


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per config field, named after it; defaults are None so only given flags override."""
    from trainer.config import SECTIONS

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
    from trainer.config import field_index

    return {name: getattr(args, name) for name in field_index() if getattr(args, name, None) is not None}


def _run_train(args: argparse.Namespace) -> int:
    from trainer.config import save_toml
    from trainer.presets import DEFAULT_PRESET, resolve_config

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
    from trainer.config import check_resolution_multiple
    from trainer.dataset import scan_dataset
    from trainer.lint import lint_dataset
    from trainer.models import load_base_model
    from trainer.text import count_tokens

    quiet_libraries()
    model = load_base_model(config.model, supported=("sd1", "sd2", "sdxl"))
    resolution = config.data.resolution or model.native_resolution
    check_resolution_multiple(resolution, model.resolution_multiple)  # training would refuse it
    scan = scan_dataset(config.data)
    report = lint_dataset(scan, config.data, resolution, lambda caption: count_tokens(model.tokenizer, caption),
                          epochs=config.train.epochs, batch_size=config.train.batch_size, steps=config.train.steps,
                          bucket_step=model.resolution_multiple)
    print(report.summary_text(max_issues=50))
    return 0 if report.ok else EXIT_USER_ERROR


def format_size(size_bytes: int) -> str:
    if size_bytes >= 1_000_000:
        return f"{size_bytes / 1e6:.1f} MB"
    return f"{size_bytes / 1e3:.1f} kB"


def quiet_libraries() -> None:
    """Our progress bar and messages only: no per-file loading bars or library chatter."""
    import warnings

    import diffusers
    import transformers
    from PIL import Image

    for library in (diffusers, transformers):
        library.utils.logging.set_verbosity_error()
        library.utils.logging.disable_progress_bar()
    # The dataset check reports oversized pictures and bad EXIF itself, saying what to do; Pillow's
    # own warnings ("could be decompression bomb DOS attack") would only alarm.
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    warnings.filterwarnings("ignore", message="Corrupt EXIF data", module="PIL")


def _train_with_progress_bar(config) -> int:
    from tqdm import tqdm

    from trainer.events import (CheckpointSaved, Notice, RunCommands, RunFinished, RunStarted, SamplesMade,
                                StepProgress)
    from trainer.loop import train

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
    from trainer.sizing import preset_sizes

    rows = preset_sizes(args.base or None, args.base_config or None)
    width = max(len(r.name) for r in rows)
    print(f"{'preset':<{width}}  {'rank':>4}  {'alpha':>5}  {'targets':<10}  {'TE':<3}  {'size':>9}  description")
    for r in rows:
        print(f"{r.name:<{width}}  {r.rank:>4}  {r.alpha:>5g}  {r.targets:<10}  {'yes' if r.text_encoder else 'no':<3}  "
              f"{format_size(r.size_bytes):>9}  {r.description}")
    print(f"(file sizes for {rows[0].base_label} at fp16, exact up to the few hundred bytes of run metadata)")
    return 0


def _run_app(args: argparse.Namespace) -> int:
    from app.__main__ import launch_from_args

    return launch_from_args(args)


def _extra_commands() -> list[Callable[[Any], None]]:
    """Subcommands defined next to the features they drive (generate, tools)."""
    registrars = []
    try:
        from trainer.cli_tools import register as register_tools
    except ImportError:  # pragma: no cover - tools not installed in this build
        return registrars
    registrars.append(register_tools)
    return registrars


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
