"""Shared fixtures: offline environment, tiny random models, small image folders, the app server."""

from __future__ import annotations

import os

# Before anything imports huggingface_hub / gradio: never touch the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ["DIFFUSERS_VERBOSITY"] = "error"
os.environ["TRANSFORMERS_VERBOSITY"] = "error"
os.environ["DO_NOT_TRACK"] = "1"

from collections.abc import Iterator, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import TYPE_CHECKING  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

if TYPE_CHECKING:
    from browser.app_server import AppServer
    from gradio_client import Client

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_sd1_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random SD1-family model saved as a diffusers folder (read-only: copy to modify)."""
    from trainer.models.demo import write_tiny_sd1

    return write_tiny_sd1(tmp_path_factory.mktemp("models") / "tiny-sd1", seed=0)


def app_error(call, *args, **kwargs) -> str:
    """The message of the gradio error an app endpoint raises; it must never carry a traceback."""
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as caught:
        call(*args, **kwargs)
    message = str(caught.value)
    assert "Traceback" not in message and "internal error" not in message, message
    return message


def make_pattern_image(size: tuple[int, int], seed: int) -> Image.Image:
    """A deterministic, structured RGB image (smooth colour field plus a few shapes)."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = rng.uniform(0, 255, size=3)
    img = np.stack([
        base[0] + 60 * np.sin(xx / (5 + seed % 7)),
        base[1] + 60 * np.cos(yy / (4 + seed % 5)),
        base[2] + 40 * np.sin((xx + yy) / 9.0),
    ], axis=-1)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def write_captioned_images(folder: Path, sizes: Sequence[tuple[int, int]],
                           caption: str = "zxq, picture {i}") -> Path:
    """``imgNN.png`` pattern images of the given sizes, each with an ``imgNN.txt`` caption; returns ``folder``."""
    folder.mkdir(parents=True)
    for i, size in enumerate(sizes):
        make_pattern_image(size, i).save(folder / f"img{i:02d}.png")
        (folder / f"img{i:02d}.txt").write_text(caption.format(i=i), encoding="utf-8")
    return folder


def write_image_folder(folder: Path) -> Path:
    """Eight 64x64 captioned images in a plain folder (captions mention 'zxq'): ``image_folder``'s content."""
    return write_captioned_images(folder, [(64, 64)] * 8, "zxq, picture {i}, red")


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """Eight 64x64 captioned images in a plain folder (captions mention 'zxq')."""
    return write_image_folder(tmp_path / "data")


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """For modules of tiny models: ~10x faster on one thread when other work shares the two cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def app_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
               tiny_sd1_dir: Path) -> Iterator[AppServer]:
    """The app on 127.0.0.1 for one test module, from the module's own ``APP_PORT`` (servers of
    different modules never share a port range)."""
    from browser.app_server import running_app

    first_port = getattr(request.module, "APP_PORT", None)
    assert isinstance(first_port, int), f"{request.module.__name__} needs APP_PORT = <first port to try>"
    projects = tmp_path_factory.mktemp(f"{request.module.__name__}-projects")
    with running_app(projects, tiny_sd1_dir, first_port=first_port) as server:
        yield server


@pytest.fixture(scope="module")
def app_client(app_server: AppServer) -> Client:
    """gradio_client on ``app_server``, files left on the server (as FileData dicts)."""
    from gradio_client import Client

    return Client(app_server.url, verbose=False, download_files=False)
