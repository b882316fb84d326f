"""A real LoRA Studio server on 127.0.0.1 for the gradio_client and browser tests.

The demo model is copied in from the session's tiny model (the same seed-0 build the app would
write), so no test pays for building it twice.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from app.launch import free_port
from app.projects import DEMO_MODEL_DIR
from app.studio import Studio
from app.ui import launch


@dataclass
class AppServer:
    studio: Studio
    url: str

    @property
    def projects(self):
        return self.studio.projects


@contextmanager
def running_app(root: Path, demo_model: Path, first_port: int, **studio_options) -> Iterator[AppServer]:
    """Serve the app on a free port from ``first_port``; closes the server and the run worker after.

    ``studio_options`` go to ``Studio.create`` (``listen=True`` confines request paths as ``--listen``
    does, while the server still binds 127.0.0.1 only)."""
    shutil.copytree(demo_model, root / "models" / DEMO_MODEL_DIR)
    studio = Studio.create(root, **studio_options)
    demo, url = launch(studio, host="127.0.0.1", port=free_port("127.0.0.1", first_port), block=False, quiet=True)
    try:
        yield AppServer(studio, url.rstrip("/"))
    finally:
        studio.close()
        demo.close()


def upload_pictures(client, dataset: str, folder: Path, count: int, make_image) -> str:
    """``count`` captioned pictures sent to /upload_images (trigger 'zxq', 64 px), as a script would."""
    from gradio_client import handle_file

    files = write_pictures(folder, count, make_image)
    *_, status, _, _ = client.predict(dataset, [handle_file(f) for f in files], "zxq", 64, api_name="/upload_images")
    assert status == f"Added {count} pictures and {count} caption files."
    return dataset


def write_pictures(folder: Path, count: int, make_image, caption: str = "zxq, picture {i}") -> list[Path]:
    """``count`` small captioned pictures; returns the image and caption paths."""
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(count):
        image: Image.Image = make_image((64, 64), i)
        image.save(folder / f"pic{i:02d}.png")
        (folder / f"pic{i:02d}.txt").write_text(caption.format(i=i), encoding="utf-8")
        files += [folder / f"pic{i:02d}.png", folder / f"pic{i:02d}.txt"]
    return files


def wait_for_page_load_events(page) -> None:
    """The app fills its boxes on page load (the last dataset, the runs); a person types after they
    appear, so a test does too (typing earlier races the load's answer, which would replace it)."""
    import re

    from playwright.sync_api import expect

    expect(page.locator("#dataset-report")).to_contain_text(re.compile("Choose a dataset|usable pictures"))
