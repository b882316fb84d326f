"""The ``lora-studio`` console script: the engine's commands plus ``app`` (the default).

``trainer.cli.main`` knows the engine's commands (train, presets, generate, inspect, ...) and
nothing of the GUI; this module adds the ``app`` command and the app's flags, and makes the
app what ``lora-studio`` alone starts. ``python -m app`` takes the app's flags only.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from trainer.cli.console import EXIT_USER_ERROR, StudioArgumentParser
from trainer.core.errors import StudioError


def port_number(text: str) -> int:
    """An argparse type: a TCP port a server can listen on (1–65535)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a port number; use a whole number from 1 to 65535.") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port number; use one from 1 to 65535 (default 7860).")
    return port


def add_app_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=port_number, default=7860, help="Port (the next free one is used if busy).")
    parser.add_argument("--listen", action="store_true", help="Bind to 0.0.0.0 so other machines can connect (use with --auth).")
    parser.add_argument("--auth", default=None, metavar="USER:PASS", help="Require a login.")
    parser.add_argument("--no-browser", action="store_true", help="Don't open a browser tab.")
    parser.add_argument("--projects", default=None, metavar="DIR", help="Where datasets and runs live (default: ~/LoRA-Studio).")
    parser.add_argument("--allow-folder", action="append", default=[], metavar="DIR",
                        help="With --listen: a folder outside the projects folder that requests may read "
                             "(repeatable; also one per line in <projects>/allowed-folders.txt).")


def register_app_command(sub: Any) -> None:
    app = sub.add_parser("app", help="Start the web app (the default with no command).")
    add_app_arguments(app)
    app.set_defaults(handler=run_app)


def run_app(args: argparse.Namespace) -> int:
    from app.launch import launch_from_args

    return launch_from_args(args)


def main(argv: Sequence[str] | None = None) -> int:
    """``lora-studio [COMMAND]``: the app without a command, else the engine's command."""
    from trainer.cli.main import main as engine_main

    return engine_main(argv, extra_commands=(register_app_command,), default=run_app, root_arguments=add_app_arguments)


def app_main(argv: Sequence[str] | None = None) -> int:
    """``python -m app``: the app's flags only."""
    parser = StudioArgumentParser(prog="python -m app", description="Start LoRA Studio's web app.")
    add_app_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_app(args)
    except StudioError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
