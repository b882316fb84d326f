"""``lora-studio`` command line: a thin client of the engine's API, like the GUI.

``main`` parses the command line and dispatches to the sub-commands defined next to what they
drive (``trainer.cli.train``: train, presets; ``trainer.cli.tools``: generate, inspect, resize,
merge, bake, extract; ``trainer.cli.prep``: caption, tags, reg-images; ``trainer.cli.grid``: grid). The console script lives in ``app.cli``, which adds the ``app`` command
(and makes it the default) on top of these, so the engine never imports the GUI. User errors end
with one actionable line and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from trainer.cli import grid, prep, tools, train
from trainer.cli.console import EXIT_INTERRUPTED, EXIT_USER_ERROR, StudioArgumentParser
from trainer.core.errors import StudioError

Command = Callable[[argparse.Namespace], int]
Registrar = Callable[[Any], None]  # adds sub-commands to an argparse sub-parsers object
ENGINE_COMMANDS: tuple[Registrar, ...] = (train.register, tools.register, grid.register, prep.register)


def main(argv: Sequence[str] | None = None, *, extra_commands: Sequence[Registrar] = (),
         default: Command | None = None, root_arguments: Registrar | None = None,
         prog: str = "lora-studio") -> int:
    """Run one command line; ``default`` handles a line without a command (else: help, exit 2)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    parser = build_parser(extra_commands, root_arguments, prog=prog)
    args = parser.parse_args(argv)
    handler: Command | None = getattr(args, "handler", None) or default
    if handler is None:
        parser.print_help(sys.stderr)
        print("\nerror: name a command (the web app starts with 'lora-studio' alone).", file=sys.stderr)
        return EXIT_USER_ERROR
    try:
        return handler(args)
    except StudioError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def build_parser(extra_commands: Sequence[Registrar] = (), root_arguments: Registrar | None = None, *,
                 prog: str = "lora-studio") -> argparse.ArgumentParser:
    parser = StudioArgumentParser(prog=prog, description="Train and use Stable Diffusion LoRAs locally.")
    if root_arguments is not None:
        root_arguments(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for register in (*extra_commands, *ENGINE_COMMANDS):
        register(sub)
    return parser
