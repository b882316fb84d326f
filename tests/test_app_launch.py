"""Starting the app: local by default, a free port when the asked one is busy, loud about --listen."""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from child_process import REPO, child_env

import app.ui
from app.launch import free_port, launch_from_args, parse_auth
from trainer.core.errors import StudioError


def test_a_busy_port_moves_to_the_next_free_one() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert free_port("127.0.0.1", port) > port


@pytest.mark.parametrize("text, expected", [(None, None), ("anna:s3cret", ("anna", "s3cret")),
                                            ("anna:pa:ss", ("anna", "pa:ss"))])
def test_auth_parsing(text, expected) -> None:
    assert parse_auth(text) == expected


@pytest.mark.parametrize("text", ["anna", ":pw", "anna:"])
def test_bad_auth_is_refused_with_an_example(text: str) -> None:
    with pytest.raises(StudioError, match="user:password"):
        parse_auth(text)


def _args(tmp_path: Path, **overrides) -> argparse.Namespace:
    values = dict(port=7860, listen=False, auth=None, no_browser=True, projects=str(tmp_path / "projects"))
    return argparse.Namespace(**{**values, **overrides})


@pytest.fixture
def launched(monkeypatch: pytest.MonkeyPatch) -> dict:
    """Replaces the server start: records what launch_from_args asked for."""
    calls: dict = {}

    def fake_launch(studio, **kwargs):
        calls.update(kwargs, root=studio.projects.root)
        return None, "http://fake"

    monkeypatch.setattr(app.ui, "launch", fake_launch)
    return calls


def test_default_launch_is_local_only_with_no_warning(tmp_path: Path, launched: dict, capsys) -> None:
    assert launch_from_args(_args(tmp_path)) == 0
    assert launched["host"] == "127.0.0.1" and launched["auth"] is None and launched["open_browser"] is False
    assert launched["root"] == (tmp_path / "projects").resolve()
    assert "WARNING" not in capsys.readouterr().err


def test_listen_without_auth_warns_loudly(tmp_path: Path, launched: dict, capsys) -> None:
    launch_from_args(_args(tmp_path, listen=True))
    assert launched["host"] == "0.0.0.0"
    assert "WARNING: --listen without --auth" in capsys.readouterr().err


def test_listen_with_auth_passes_the_login_and_stays_quiet(tmp_path: Path, launched: dict, capsys) -> None:
    launch_from_args(_args(tmp_path, listen=True, auth="anna:s3cret"))
    assert launched["auth"] == ("anna", "s3cret")
    assert "WARNING" not in capsys.readouterr().err


def test_python_dash_m_app_serves_the_page_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    import signal
    import time
    import urllib.request

    port = free_port("127.0.0.1", 7850)
    env = child_env(GRADIO_ANALYTICS_ENABLED="False")
    server = subprocess.Popen([sys.executable, "-m", "app", "--no-browser", "--port", str(port),
                               "--projects", str(tmp_path / "projects")], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        page = ""
        while time.monotonic() < deadline and server.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
                    page = response.read().decode("utf-8")
                break
            except OSError:
                time.sleep(0.5)  # polling a server in another process; no event to wait on
        assert "LoRA Studio" in page, server.stdout.read() if server.poll() is not None else "no page"
        assert (tmp_path / "projects" / "datasets").is_dir()
    finally:
        server.send_signal(signal.SIGINT)
        output, _ = server.communicate(timeout=60)
    assert server.returncode == 0, output
    assert "projects in" in output


def test_python_dash_m_app_takes_the_same_flags() -> None:
    result = subprocess.run([sys.executable, "-m", "app", "--help"], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0
    for flag in ("--port", "--listen", "--auth", "--no-browser", "--projects"):
        assert flag in result.stdout
