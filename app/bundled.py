"""Files that ship with the app: the top-level ``assets/`` folder (CSS, favicon, example pictures).

pyproject installs that folder as the package ``app.assets``; it is found through
``importlib.resources`` so a wheel, an editable install and a checkout all serve the same files.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

ASSETS_PACKAGE = "app.assets"
EXAMPLE_DATASET = "example"  # the dataset name the example pictures go into by default


def asset_path(name: str) -> Path:
    """A file of ``assets/`` on disk (gradio serves paths, so installs must be unzipped)."""
    return Path(str(resources.files(ASSETS_PACKAGE).joinpath(name)))


def example_files() -> list[Path]:
    """The example pictures with their caption files, for a first try without one's own pictures."""
    folder = asset_path("examples")
    return sorted(p for p in folder.iterdir() if p.suffix in (".png", ".txt"))
