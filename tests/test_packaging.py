"""The wheel a user installs carries the presets, the app's assets and the bundled model configs.

Built with ``pip wheel . --no-deps`` and installed into a fresh virtual environment (with the
already-installed dependencies visible, so nothing is downloaded): ``lora-studio presets`` must
list every preset and the app must serve its stylesheet, favicon and example pictures, all from
the installed wheel, never from this checkout.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
import venv
import zipfile
from pathlib import Path

import pytest

from app.launch import free_port
from tests.child_process import child_env

REPO = Path(__file__).resolve().parents[1]
PRESETS = sorted(p.stem for p in (REPO / "presets").glob("*.toml"))

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out)], check=True, capture_output=True, text=True, timeout=600)
    (built,) = out.glob("lora_studio-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel installed; returns its bin/ (Scripts/ on Windows) folder."""
    env_dir = tmp_path_factory.mktemp("venv")
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env_dir)
    bin_dir = env_dir / ("Scripts" if os.name == "nt" else "bin")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(bin_dir / "python"), "install", "--no-deps",
                    "--no-index", "-q", str(wheel)], check=True, capture_output=True, text=True, timeout=600)
    return bin_dir


def _outside_checkout_env() -> dict[str, str]:
    env = child_env()
    env.pop("PYTHONPATH", None)
    return env


def test_the_wheel_holds_presets_assets_and_model_configs(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"trainer/config/builtin_presets/{name}.toml" for name in PRESETS} <= names
    assert {"app/assets/style.css", "app/assets/favicon.png"} <= names
    examples = {n for n in names if n.startswith("app/assets/examples/")}
    assert len([n for n in examples if n.endswith(".png")]) >= 6
    assert {n[:-4] for n in examples if n.endswith(".png")} == {n[:-4] for n in examples if n.endswith(".txt")}
    assert "trainer/models/configs/sd15/unet/config.json" in names
    assert not any(n.startswith(("tests/", "bench/", "presets/", "assets/")) for n in names)


def test_installed_wheel_lists_every_preset(installed: Path, tmp_path: Path) -> None:
    where = subprocess.run([str(installed / "python"), "-c", "import trainer; print(trainer.__file__)"],
                           cwd=tmp_path, env=_outside_checkout_env(), capture_output=True, text=True, timeout=120)
    assert Path(where.stdout.strip()).is_relative_to(installed.parent), where.stdout + where.stderr
    result = subprocess.run([str(installed / "lora-studio"), "presets"], cwd=tmp_path, env=_outside_checkout_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    listed = sorted(line.split()[0] for line in result.stdout.splitlines()[1:-1])
    assert listed == PRESETS


def test_installed_wheel_serves_the_apps_css_and_examples(installed: Path, tmp_path: Path) -> None:
    port = free_port("127.0.0.1", 7950)
    server = subprocess.Popen([str(installed / "lora-studio"), "--no-browser", "--port", str(port),
                               "--projects", str(tmp_path / "projects")], cwd=tmp_path, env=_outside_checkout_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        config = _get(f"http://127.0.0.1:{port}/config", server)
        css = (REPO / "assets" / "style.css").read_text(encoding="utf-8")
        first_rule = next(line for line in css.splitlines() if line.strip() and not line.startswith("/*"))
        assert first_rule.strip() in config.replace("\\n", "\n").replace('\\"', '"')
        favicon = urllib.request.urlopen(f"http://127.0.0.1:{port}/favicon.ico", timeout=30).read()
        assert favicon == (REPO / "assets" / "favicon.png").read_bytes()
    finally:
        server.send_signal(signal.SIGINT)
        output, _ = server.communicate(timeout=60)
    assert server.returncode == 0, output
    result = subprocess.run([str(installed / "python"), "-c",
                             "from app.projects import Projects; import sys; "
                             "print(Projects(sys.argv[1]).ensure().add_example_pictures().text())",
                             str(tmp_path / "p2")], cwd=tmp_path, env=_outside_checkout_env(), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    copied = sorted(p.name for p in (tmp_path / "p2" / "datasets" / "example").iterdir())
    shipped = sorted(p.name for p in (REPO / "assets" / "examples").iterdir())
    assert copied == shipped


def _get(url: str, server: subprocess.Popen) -> str:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and server.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.read().decode("utf-8")
        except OSError:
            time.sleep(0.5)  # polling a server in another process; no event to wait on
    raise AssertionError(server.stdout.read() if server.poll() is not None else f"no answer from {url}")
