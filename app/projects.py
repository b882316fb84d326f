"""The project folder: where the app keeps datasets, runs, models and generated images on disk.

Layout under the root (default ``~/LoRA-Studio``)::

    datasets/<name>/        pictures + .txt caption sidecars (what training reads)
    runs/<name>.safetensors the LoRA of a run; runs/<name>_run/ its checkpoints, samples, config
    loras/                  LoRA files uploaded in the Generate/Tools tabs
    models/demo-tiny-sd1/   the demo model, written on first use
    outputs/                images made in the Generate tab, results of the Tools tab
    .thumbs/                small previews for the dataset grid

Everything that arrives from the browser (uploaded files, typed names) goes through
``app.access``: ``safe_name`` (no directory part, no leading dot, no characters a file system may
object to), so an upload can never land outside its folder, and ``paths`` (the ``PathRule``),
which confines typed paths to the project folder when the server listens beyond this computer.
"""

from __future__ import annotations

import hashlib
import shutil
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from app.access import PathRule, child_path, safe_name
from app.bundled import EXAMPLE_DATASET, example_files
from trainer.core.atomic import atomic_write_text
from trainer.core.errors import DatasetError, ModelLoadError, StudioError
from trainer.data.captions import CAPTION_EXTENSIONS, read_caption_file
from trainer.data.images import image_extensions

DEMO_MODEL_CHOICE = "Demo model (tiny, random: makes noise, for trying the app)"
DEMO_MODEL_DIR = "demo-tiny-sd1"
DEMO_RESOLUTION = 64  # the demo model's native size
THUMB_SIDE = 96


@dataclass
class ImportSummary:
    """What an upload or folder import did, for the status line."""

    added: list[str] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file name, reason)
    kept: list[str] = field(default_factory=list)  # captions in the dataset that differ from the uploaded ones

    def text(self) -> str:
        parts = [f"Added {len(self.added)} picture{'s' * (len(self.added) != 1)}"]
        if self.captions:
            parts.append(f"{len(self.captions)} caption file{'s' * (len(self.captions) != 1)}")
        line = " and ".join(parts) + "."
        if self.skipped:
            reasons = "; ".join(f"{name}: {why}" for name, why in self.skipped[:5])
            more = f" (+{len(self.skipped) - 5} more)" if len(self.skipped) > 5 else ""
            line += f" Skipped {len(self.skipped)}: {reasons}{more}."
        if self.kept:
            names = ", ".join(self.kept[:5]) + (f" (+{len(self.kept) - 5} more)" if len(self.kept) > 5 else "")
            line += (f" Kept {len(self.kept)} caption{'s' * (len(self.kept) != 1)} of the dataset that differ"
                     f"{'s' * (len(self.kept) == 1)} from the uploaded one{'s' * (len(self.kept) != 1)}: {names}"
                     " (edit them in the grid if the uploaded text is the one you want).")
        return line


def hidden_file_reason(name: str) -> str:
    """Why a hidden file is not a picture (empty for a normal name).

    Copying a folder from a Mac brings ``._name.png`` resource forks (metadata, not image data)
    and ``.DS_Store``; stored under a safe name (``_name.png``) they would look like unreadable pictures.
    """
    name = name.replace("\\", "/").rsplit("/", 1)[-1]  # "..\\..\\x.png" is x.png, not a hidden file
    if name.startswith("._"):
        return "a macOS resource fork (Finder metadata, not a picture)"
    if name.startswith(".") and not name.startswith(".."):  # "..": a path-traversal remnant, made safe later
        return "a hidden file (system metadata, not a picture)"
    return ""


class Projects:
    """One project root on disk and the few operations the tabs need on it."""

    def __init__(self, root: str | Path, build_lock: threading.Lock | None = None,
                 paths: PathRule | None = None) -> None:
        self.root = Path(root).expanduser().resolve()
        self.paths = paths or PathRule()  # where typed paths may point (anywhere, unless --listen)
        self._demo_lock = build_lock or threading.Lock()  # writing the demo model builds modules

    # --- folders ---------------------------------------------------------------------------------

    @property
    def datasets_dir(self) -> Path:
        return self.root / "datasets"

    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    @property
    def loras_dir(self) -> Path:
        return self.root / "loras"

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    @property
    def outputs_dir(self) -> Path:
        return self.root / "outputs"

    @property
    def thumbs_dir(self) -> Path:
        return self.root / ".thumbs"

    def ensure(self) -> Projects:
        for folder in (self.datasets_dir, self.runs_dir, self.loras_dir, self.models_dir, self.outputs_dir,
                       self.thumbs_dir):
            folder.mkdir(parents=True, exist_ok=True)
        return self

    # --- datasets --------------------------------------------------------------------------------

    def list_datasets(self) -> list[str]:
        if not self.datasets_dir.is_dir():
            return []
        return sorted(p.name for p in self.datasets_dir.iterdir() if p.is_dir() and not p.name.startswith("."))

    def dataset_dir(self, name: str, *, create: bool = False) -> Path:
        """The folder of dataset ``name`` (created when asked)."""
        if not str(name or "").strip():
            raise DatasetError("No dataset is chosen.",
                               hint="Pick a dataset or type a name for a new one in the Dataset tab.")
        folder = self.datasets_dir / safe_name(name, "dataset name")
        if create:
            folder.mkdir(parents=True, exist_ok=True)
        elif not folder.is_dir():
            raise DatasetError(f"There is no dataset called '{name}' in {self.datasets_dir}.",
                               hint="Create it in the Dataset tab by uploading pictures.")
        return folder

    def add_files(self, dataset: str, files: Iterable[str | Path]) -> ImportSummary:
        """Copy uploaded pictures and caption sidecars into ``dataset`` under safe names."""
        folder = self.dataset_dir(dataset, create=True)
        summary = ImportSummary()
        images, captions = [], []
        for raw in files:
            path = Path(raw)
            suffix = path.suffix.lower()
            hidden = hidden_file_reason(path.name)
            if hidden:
                summary.skipped.append((path.name, hidden))
            elif suffix in image_extensions():
                images.append(path)
            elif suffix in CAPTION_EXTENSIONS:
                captions.append(path)
            else:
                summary.skipped.append(
                    (path.name, "not a picture type LoRA Studio reads (PNG, JPEG, WebP, BMP, GIF, TIFF)"))
        stems: dict[str, str] = {}  # original stem -> stem used in the dataset
        for path in images:
            try:
                target = _copy_unique(path, folder, safe_name(path.name, "file name"))
            except OSError as exc:
                summary.skipped.append((path.name, f"cannot be read ({exc.strerror or exc})"))
                continue
            if target is None:
                summary.skipped.append((path.name, "already in the dataset"))
                continue
            stems[path.stem] = target.stem
            summary.added.append(target.name)
        for path in captions:
            stem = stems.get(path.stem) or safe_name(path.stem, "file name")
            try:
                text, _ = read_caption_file(path)
            except OSError as exc:
                summary.skipped.append((path.name, f"cannot be read ({exc.strerror or exc})"))
                continue
            except DatasetError as exc:  # not text (NUL bytes): refused, named, never trained on
                summary.skipped.append((path.name, exc.message.removeprefix(f"{path.name} ")))
                continue
            existing = self.caption_path(folder / f"{stem}.png")  # the stem's .txt or .caption, if any
            if existing.is_file():  # an upload never overwrites a caption: it may have been edited here
                try:
                    same = read_caption_file(existing)[0] == text
                except (OSError, DatasetError):
                    same = False
                if not same:
                    summary.kept.append(existing.name)
                continue
            atomic_write_text(folder / f"{stem}.txt", text + "\n")
            summary.captions.append(f"{stem}.txt")
        return summary

    def import_folder(self, dataset: str, source: str | Path) -> ImportSummary:
        """Copy every picture and caption of a folder on this computer into ``dataset``."""
        text = str(source).strip()
        if not text:
            raise DatasetError("No folder given.", hint="Type the full path of a folder that holds your pictures.")
        folder = self.paths.check(text, "folder")
        if not folder.is_dir():
            raise DatasetError(f"{folder} is not a folder on this computer.",
                               hint="Type the full path of a folder that holds your pictures.")
        wanted = image_extensions() | set(CAPTION_EXTENSIONS)
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in wanted)
        if not any(p.suffix.lower() in image_extensions() and not hidden_file_reason(p.name) for p in files):
            raise DatasetError(f"Found 0 pictures in {folder}.",
                               hint="Choose the folder that holds the .png/.jpg/.webp files themselves.")
        return self.add_files(dataset, files)

    def add_example_pictures(self, dataset: str = EXAMPLE_DATASET) -> ImportSummary:
        """Copy the example pictures that ship with the app (and their captions) into ``dataset``."""
        return self.add_files(dataset, example_files())

    def remove_file(self, dataset: str, file_name: str) -> None:
        """Delete one picture of a dataset and its caption sidecars."""
        folder = self.dataset_dir(dataset)
        path = child_path(folder, file_name, "file name")
        if not path.is_file():
            raise DatasetError(f"{file_name} is not in dataset '{dataset}'.", hint="Reload the dataset.")
        for ext in CAPTION_EXTENSIONS:
            path.with_suffix(ext).unlink(missing_ok=True)
        path.unlink()

    def caption_path(self, image: Path) -> Path:
        """The sidecar that holds ``image``'s caption: an existing .txt/.caption, else a new .txt."""
        for ext in CAPTION_EXTENSIONS:
            candidate = image.with_suffix(ext)
            if candidate.is_file():
                return candidate
        return image.with_suffix(".txt")

    def thumbnail(self, image: Path) -> Path | None:
        """A small WebP preview of ``image`` (made once per file version); None if it can't be read."""
        from trainer.data.images import load_image

        stat = image.stat()
        key = hashlib.sha1(f"{image}:{stat.st_mtime_ns}:{stat.st_size}".encode()).hexdigest()[:20]
        thumb = self.thumbs_dir / f"{key}.webp"
        if thumb.is_file():
            return thumb
        try:
            picture = load_image(image)
        except StudioError:
            return None
        picture.thumbnail((THUMB_SIDE, THUMB_SIDE))
        self.thumbs_dir.mkdir(parents=True, exist_ok=True)
        picture.save(thumb, "WEBP", quality=80)
        return thumb

    # --- base models -----------------------------------------------------------------------------

    def base_model_choices(self) -> list[str]:
        """The demo model, models in ``models/`` (diffusers folders and .safetensors files, baked ones
        included), then checkpoints baked into ``outputs/`` by earlier versions."""
        choices = [DEMO_MODEL_CHOICE]
        if self.models_dir.is_dir():
            for entry in sorted(self.models_dir.iterdir()):
                if entry.name == DEMO_MODEL_DIR or entry.name.startswith("."):
                    continue
                if (entry.is_dir() and (entry / "model_index.json").is_file()) or entry.suffix == ".safetensors":
                    choices.append(str(entry))
        if self.outputs_dir.is_dir():
            choices += [str(p) for p in sorted(self.outputs_dir.glob("*.safetensors")) if is_checkpoint_file(p)]
        return choices

    def base_config_for(self, base: str) -> str:
        """The config folder a baked checkpoint names in its header (empty for any other base)."""
        path = Path(str(base or "").strip())
        if path.suffix.lower() != ".safetensors" or not path.is_file():
            return ""
        from trainer.core.safetensors_header import read_safetensors_header
        from trainer.tools.bake import BASE_CONFIG_KEY

        try:
            _, metadata = read_safetensors_header(path)
        except (OSError, StudioError):
            return ""
        folder = metadata.get(BASE_CONFIG_KEY, "")
        return folder if folder and Path(folder).is_dir() else ""

    def new_model_path(self, stem: str) -> Path:
        """A ``.safetensors`` path in ``models/`` that does not exist yet (where baked checkpoints go)."""
        self.models_dir.mkdir(parents=True, exist_ok=True)
        base = safe_name(stem, "file name")
        candidate, n = self.models_dir / f"{base}.safetensors", 2
        while candidate.exists():
            candidate, n = self.models_dir / f"{base}-{n}.safetensors", n + 1
        return candidate

    def resolve_base(self, choice: str) -> str:
        """What the engine's ``ModelConfig.base`` gets for a base-model field value."""
        text = str(choice or "").strip()
        if not text:
            raise ModelLoadError("No base model is chosen.",
                                 hint="Pick the demo model, or type the path of a diffusers folder or "
                                      ".safetensors checkpoint.")
        if text == DEMO_MODEL_CHOICE:
            return str(self.demo_model())
        return self.model_source(text, "base model")

    def model_source(self, text: str, what: str) -> str:
        """A typed model path (checked against ``paths``) or a hub id, as given."""
        if not self.paths.allows(text) and not _hub_id_only(text):
            self.paths.check(text, what)
        return text

    def base_choice_for(self, base: str) -> str:
        """The base-model field value that names ``base`` (the demo label for the demo model's folder)."""
        demo = self.models_dir / DEMO_MODEL_DIR
        try:
            if Path(base).resolve() == demo.resolve():
                return DEMO_MODEL_CHOICE
        except OSError:
            pass
        return base

    def is_demo(self, choice: str) -> bool:
        return str(choice or "").strip() == DEMO_MODEL_CHOICE

    def demo_model(self) -> Path:
        """The demo model's folder, written the first time it is needed."""
        folder = self.models_dir / DEMO_MODEL_DIR
        with self._demo_lock:
            if not (folder / "model_index.json").is_file():
                from trainer.models.demo import write_tiny_sd1

                staging = self.models_dir / f".{DEMO_MODEL_DIR}.partial"
                shutil.rmtree(staging, ignore_errors=True)
                write_tiny_sd1(staging)
                shutil.rmtree(folder, ignore_errors=True)
                staging.rename(folder)
        return folder

    # --- LoRA files ------------------------------------------------------------------------------

    def run_output(self, run_name: str) -> Path:
        return self.runs_dir / f"{safe_name(run_name, 'run name')}.safetensors"

    def lora_files(self) -> list[Path]:
        """LoRA files this app knows: the runs' exports and uploads, newest first."""
        found = []
        for folder in (self.runs_dir, self.loras_dir, self.outputs_dir):
            if folder.is_dir():
                found += [p for p in folder.glob("*.safetensors") if not p.name.startswith(".")]
        found = [p for p in found if not is_checkpoint_file(p)]  # a baked checkpoint is a base, not a LoRA
        return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)

    def store_lora_upload(self, upload: str | Path) -> Path:
        """Copy an uploaded LoRA file into ``loras/`` (same content twice is stored once)."""
        path = Path(upload)
        name = safe_name(path.name, "file name")
        if not name.lower().endswith(".safetensors"):
            raise StudioError(f"{path.name} is not a .safetensors file.",
                              hint="LoRA Studio only loads .safetensors LoRAs (pickled .ckpt/.pt files can run code).")
        self.loras_dir.mkdir(parents=True, exist_ok=True)
        target = _copy_unique(path, self.loras_dir, name)
        return target if target is not None else _existing_copy(path, self.loras_dir, name)

    def new_output_path(self, stem: str, suffix: str) -> Path:
        """A path in ``outputs/`` that does not exist yet."""
        self.outputs_dir.mkdir(parents=True, exist_ok=True)
        base = safe_name(stem, "file name")
        candidate = self.outputs_dir / f"{base}{suffix}"
        n = 2
        while candidate.exists():
            candidate = self.outputs_dir / f"{base}-{n}{suffix}"
            n += 1
        return candidate


# --- helpers -------------------------------------------------------------------------------------


def _hub_id_only(text: str) -> bool:
    """``owner/name`` that is no path on this computer (a hub id reads no local file)."""
    from trainer.models.loading import HUB_ID

    return bool(HUB_ID.match(text)) and not text.startswith((".", "~", "/")) and not Path(text).exists()


CHECKPOINT_KEY_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner.")


def is_checkpoint_file(path: Path) -> bool:
    """Whether a .safetensors file is a whole model (LDM keys), read from its header alone."""
    from trainer.core.safetensors_header import read_safetensors_header

    try:
        entries, _ = read_safetensors_header(path)
    except (OSError, StudioError):
        return False
    return any(key.startswith(CHECKPOINT_KEY_PREFIXES) for key in entries)


def _same_file_content(a: Path, b: Path) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    return _sha256(a) == _sha256(b)


def _sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _copy_unique(source: Path, folder: Path, name: str) -> Path | None:
    """Copy ``source`` to ``folder/name``, numbering the name if taken; None if an identical copy exists."""
    target = folder / name
    stem, suffix = target.stem, target.suffix
    n = 2
    while target.exists():
        if target.is_file() and _same_file_content(source, target):
            return None
        target = folder / f"{stem}-{n}{suffix}"
        n += 1
    shutil.copyfile(source, target)
    return target


def _existing_copy(source: Path, folder: Path, name: str) -> Path:
    target = folder / name
    stem, suffix = target.stem, target.suffix
    n = 2
    while not (target.is_file() and _same_file_content(source, target)):
        target = folder / f"{stem}-{n}{suffix}"
        n += 1
    return target
