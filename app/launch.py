"""Starting the local web app from parsed ``lora-studio`` / ``python -m app`` flags.

Binds 127.0.0.1 unless ``--listen``; takes the next free port when the asked one is busy; never
makes a share link; opens the browser unless ``--no-browser``.
"""

from __future__ import annotations

import argparse
import errno
import os
import socket
import sys
import tempfile
from pathlib import Path

from trainer.core.errors import StudioError

DEFAULT_PROJECTS = Path("~/LoRA-Studio")
PORT_SEARCH = 100  # ports tried after a busy one

LISTEN_WARNING = """
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
!!  WARNING: --listen without --auth.                                                !!
!!  Anyone who can reach this computer on port {port:<5} can use LoRA Studio: read your   !!
!!  pictures, start training and write files in {root_short:<38}!!
!!  Add --auth user:password, or drop --listen to stay on this computer only.         !!
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
"""


def parse_auth(text: str | None) -> tuple[str, str] | None:
    if text is None:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise StudioError("--auth must look like user:password.", hint="For example --auth anna:s3cret.")
    return user, password


def free_port(host: str, wanted: int) -> int:
    """``wanted`` if nothing listens on it, else the next free port after it."""
    for port in range(wanted, min(wanted + PORT_SEARCH, 65536)):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((host, port))
            except OSError as exc:
                if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                    continue
                raise StudioError(f"Cannot open port {port} on {host}: {exc.strerror or exc}.",
                                  hint="Check the --port and --listen settings.") from None
            return port
    raise StudioError(f"Ports {wanted}–{wanted + PORT_SEARCH - 1} are all busy.", hint="Pass another --port.")


def writable_projects_folder(root: Path) -> Path:
    """``root`` created if missing; a file, or a folder this user cannot write in, is a clear error."""
    hint = "Pass --projects with a folder you can write to (it is created if missing)."
    if root.exists() and not root.is_dir():
        raise StudioError(f"The projects folder {root} is a file, not a folder.", hint=hint)
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise StudioError(f"Cannot write in the projects folder {root}: {exc.strerror or exc}.", hint=hint) from None
    return root


def launch_from_args(args: argparse.Namespace) -> int:
    """Start the app from parsed ``lora-studio`` flags; returns when the server stops (Ctrl-C)."""
    host = "0.0.0.0" if args.listen else "127.0.0.1"
    auth = parse_auth(args.auth)
    root = writable_projects_folder(Path(args.projects).expanduser() if args.projects else DEFAULT_PROJECTS.expanduser())
    from app.ui import (  # gradio: a few seconds, so only once the flags are fine
        launch,
        offline_environment,
    )

    offline_environment()
    port = free_port(host, args.port)
    if port != args.port:
        print(f"Port {args.port} is busy; using {port}.")
    if args.listen and auth is None:
        print(LISTEN_WARNING.format(port=port, root_short=str(root)[-38:]), file=sys.stderr)
    from app.studio import Studio

    studio = Studio.create(root, listen=args.listen, allowed_folders=getattr(args, "allow_folder", ()))
    print(f"LoRA Studio: projects in {studio.projects.root}")
    if args.listen:
        print("Requests may name paths in: " + ", ".join(str(r) for r in studio.projects.paths.roots))
    try:
        launch(studio, host=host, port=port, auth=auth, open_browser=not args.no_browser and not os.environ.get("CI"))
    except KeyboardInterrupt:
        print("Stopped.")
    return 0
