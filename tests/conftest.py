"""Shared fixtures: offline environment, tiny random models, small image folders."""

from __future__ import annotations

import os

# Before anything imports huggingface_hub / gradio: never touch the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ["DIFFUSERS_VERBOSITY"] = "error"
os.environ["TRANSFORMERS_VERBOSITY"] = "error"
os.environ["DO_NOT_TRACK"] = "1"

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_sd1_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random SD1-family model saved as a diffusers folder (read-only: copy to modify)."""
    from trainer.demo_model import write_tiny_sd1

    return write_tiny_sd1(tmp_path_factory.mktemp("models") / "tiny-sd1", seed=0)


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


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """Eight 64x64 captioned images in a plain folder (captions mention 'zxq')."""
    folder = tmp_path / "data"
    folder.mkdir()
    for i in range(8):
        make_pattern_image((64, 64), i).save(folder / f"img{i:02d}.png")
        (folder / f"img{i:02d}.txt").write_text(f"zxq, picture {i}, red", encoding="utf-8")
    return folder
