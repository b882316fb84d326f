"""WD14-format booru taggers (SmilingWolf's ``wd-*-tagger-v3`` family): an ONNX model and its tags.

The model takes NHWC float32 BGR pictures in 0-255, white-padded to a square of the size its
input declares (448 for the published ones), and outputs one sigmoid probability per row of
``selected_tags.csv`` (header ``tag_id,name,category,count``; category 9 = rating, 0 = general,
4 = character; ratings come first). ``select_tags`` turns those into a caption: general and
character thresholds (kept when ``p >= threshold``, as kohya does), a blacklist, ``_`` to spaces
except in kaomoji such as ``^_^``, a maximum count, rating tags only when asked for.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from trainer.core.errors import ConfigError, ModelLoadError

MODEL_FILE, TAGS_FILE = "model.onnx", "selected_tags.csv"
RATING, GENERAL, CHARACTER = 9, 0, 4
DEFAULT_SIZE = 448  # when the model's input side is symbolic
SUGGESTED_TAGGER = "SmilingWolf/wd-vit-tagger-v3"
# The kaomoji of the WD14 tag list, whose underscores are part of the face (SmilingWolf's list).
KAOMOJIS = frozenset({"0_0", "(o)_(o)", "+_+", "+_-", "._.", "<o>_<o>", "<|>_<|>", "=_=", ">_<", "3_3", "6_9",
                      ">_o", "@_@", "^_^", "o_o", "u_u", "x_x", "|_|", "||_||"})


@dataclass(frozen=True)
class TagLabel:
    name: str  # as in the CSV (underscores)
    category: int


@dataclass(frozen=True)
class TaggerSettings:
    """How probabilities become a caption."""

    general_threshold: float = 0.35  # SmilingWolf's and kohya's default
    character_threshold: float = 0.85  # SmilingWolf's default (a wrong character name hurts more)
    blacklist: tuple[str, ...] = ()  # tags never written (with or without underscores)
    replace_underscores: bool = True
    max_tags: int = 0  # 0 = no limit; otherwise the most confident ones (ratings not counted)
    rating_tags: bool = False  # put the most likely rating (general/sensitive/...) first
    character_first: bool = True

    def __post_init__(self) -> None:
        for name in ("general_threshold", "character_threshold"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise ConfigError(f"The tagger's {name.replace('_', ' ')} {value} is out of range.",
                                  hint="Use a probability from 0 to 1 (0.35 general, 0.85 character are usual).")
        if self.max_tags < 0:
            raise ConfigError(f"Max tags {self.max_tags} is negative.", hint="Use 0 (no limit) or a positive number.")
        object.__setattr__(self, "blacklist", tuple(t.strip() for t in self.blacklist if t.strip()))


def parse_tag_list(text: str) -> tuple[str, ...]:
    """A comma- or newline-separated list of tags, as typed."""
    return tuple(t.strip() for t in text.replace("\n", ",").split(",") if t.strip())


def tag_text(name: str, replace_underscores: bool) -> str:
    """A tag as written into a caption: ``long_hair`` -> ``long hair``; kaomoji stay as they are."""
    return name.replace("_", " ") if replace_underscores and name not in KAOMOJIS else name


def read_tags_csv(path: Path) -> list[TagLabel]:
    """The rows of ``selected_tags.csv`` in output order."""
    try:
        with Path(path).open(encoding="utf-8", newline="") as fh:
            rows = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"Cannot read the tag list {path}: {exc}.",
                             hint=f"Download {TAGS_FILE} again from the tagger's model page.") from None
    if not rows or [c.strip() for c in rows[0][:3]] != ["tag_id", "name", "category"]:
        raise ModelLoadError(f"{path} is not a WD14 tag list (its header should start 'tag_id,name,category').",
                             hint=f"Use the {TAGS_FILE} that comes with the tagger's model.onnx.")
    try:
        return [TagLabel(row[1], int(row[2])) for row in rows[1:] if row]
    except (IndexError, ValueError):
        raise ModelLoadError(f"{path} has a row without a name or a numeric category.",
                             hint=f"Download {TAGS_FILE} again from the tagger's model page.") from None


def select_tags(probs: np.ndarray, labels: Sequence[TagLabel], settings: TaggerSettings) -> list[str]:
    """The caption tags of one picture's probabilities: characters, then general tags, each most
    confident first; the rating (argmax, no threshold, as kohya) in front when asked for."""
    banned = {_normal(t) for t in settings.blacklist}
    picked: dict[int, list[tuple[float, int]]] = {GENERAL: [], CHARACTER: []}
    ratings: list[tuple[float, int]] = []
    for index, (p, label) in enumerate(zip(probs.tolist(), labels)):
        if _normal(label.name) in banned:
            continue
        if label.category == RATING:
            ratings.append((p, index))
        elif label.category == CHARACTER and p >= settings.character_threshold:
            picked[CHARACTER].append((p, index))
        elif label.category == GENERAL and p >= settings.general_threshold:
            picked[GENERAL].append((p, index))
    order = [CHARACTER, GENERAL] if settings.character_first else [GENERAL, CHARACTER]
    if settings.character_first:
        chosen = [i for category in order for _, i in sorted(picked[category], key=lambda pi: (-pi[0], pi[1]))]
    else:
        chosen = [i for _, i in sorted(picked[GENERAL] + picked[CHARACTER], key=lambda pi: (-pi[0], pi[1]))]
    if settings.max_tags:
        by_confidence = sorted(chosen, key=lambda i: -float(probs[i]))[:settings.max_tags]
        keep = set(by_confidence)
        chosen = [i for i in chosen if i in keep]
    if settings.rating_tags and ratings:
        chosen.insert(0, max(ratings)[1])
    return [tag_text(labels[i].name, settings.replace_underscores) for i in chosen]


def prepare_image(image: Image.Image, size: int) -> np.ndarray:
    """[size, size, 3] float32 BGR 0-255: transparency on white, centred on a white square, resized."""
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(canvas, rgba)
    image = image.convert("RGB")
    side = max(image.size)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    if side != size:
        square = square.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=3.0)
    return np.asarray(square, dtype=np.float32)[:, :, ::-1]


class WD14Tagger:
    """One loaded tagger; ``caption_batch`` turns pictures into tag captions."""

    kind = "tagger"

    def __init__(self, model_path: Path, tags_path: Path, settings: TaggerSettings | None = None,
                 device: str = "auto") -> None:
        ort = _onnxruntime()
        self.name = model_path.parent.name if model_path.name == MODEL_FILE else model_path.stem
        self.labels = read_tags_csv(tags_path)
        self.settings = settings or TaggerSettings()
        available = ort.get_available_providers()
        providers = ["CPUExecutionProvider"]
        if device != "cpu" and "CUDAExecutionProvider" in available:
            providers.insert(0, "CUDAExecutionProvider")
        options = ort.SessionOptions()
        options.log_severity_level = 3  # its notes about unused initialisers are not the user's concern
        try:
            self.session = ort.InferenceSession(str(model_path), options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own classes for any bad file  # noqa: BLE001
            raise ModelLoadError(f"{model_path} is not a model onnxruntime can load ({str(exc)[:200]}).",
                                 hint=f"Download {MODEL_FILE} again (it may be cut short).") from None
        self.device = "cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        model_input = self.session.get_inputs()[0]
        shape = list(model_input.shape)
        channels = shape[3] if len(shape) == 4 else None
        if len(shape) != 4 or (isinstance(channels, int) and channels != 3):
            raise ModelLoadError(f"{model_path} takes input of shape {shape}, not pictures [batch, side, side, 3].",
                                 hint="Use a WD14-format tagger (e.g. the wd-*-tagger-v3 family).")
        self.input_name = model_input.name
        self.size = shape[1] if isinstance(shape[1], int) and shape[1] > 0 else DEFAULT_SIZE
        self.fixed_batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else 0  # old exports: 1

    def probabilities(self, images: Sequence[Image.Image]) -> np.ndarray:
        """[len(images), tags] probabilities."""
        batch = np.stack([prepare_image(image, self.size) for image in images])
        if self.fixed_batch:
            parts = [self._run(batch[i:i + self.fixed_batch]) for i in range(0, len(batch), self.fixed_batch)]
            return np.concatenate(parts)[:len(images)]
        return self._run(batch)

    def caption_batch(self, images: Sequence[Image.Image]) -> list[str]:
        return [", ".join(select_tags(p, self.labels, self.settings)) for p in self.probabilities(images)]

    def _run(self, batch: np.ndarray) -> np.ndarray:
        if self.fixed_batch and len(batch) < self.fixed_batch:  # pad a short last batch
            batch = np.concatenate([batch, np.repeat(batch[-1:], self.fixed_batch - len(batch), axis=0)])
        probs = self.session.run(None, {self.input_name: batch})[0]
        if probs.shape[-1] != len(self.labels):
            raise ModelLoadError(f"The tagger outputs {probs.shape[-1]} values but its {TAGS_FILE} lists "
                                 f"{len(self.labels)} tags.", hint=f"Use the {TAGS_FILE} that came with this model.")
        return probs.astype(np.float32)


def open_tagger(source: str, settings: TaggerSettings | None = None, device: str = "auto") -> WD14Tagger:
    """A tagger from a folder (``model.onnx`` + ``selected_tags.csv``), a ``.onnx`` file with the
    CSV beside it, or a hub id (downloaded once, from the local cache afterwards)."""
    text = str(source or "").strip()
    if not text:
        raise ModelLoadError("No tagger model is chosen.", hint=download_help())
    path = Path(text).expanduser()
    if path.is_dir():
        model, tags = path / MODEL_FILE, path / TAGS_FILE
    elif path.is_file():
        model, tags = path, path.with_name(TAGS_FILE)
    elif _looks_like_hub_id(text):
        model, tags = _from_hub(text)
    else:
        raise ModelLoadError(f"Tagger not found: {text}.", hint=download_help())
    for needed in (model, tags):
        if not needed.is_file():
            raise ModelLoadError(f"{needed.name} is missing in {needed.parent}.",
                                 hint=f"A tagger folder holds {MODEL_FILE} and {TAGS_FILE}. " + download_help())
    return WD14Tagger(model, tags, settings, device)


def download_help(folder: str | Path = "models/taggers") -> str:
    """What to download once, and where, to tag offline."""
    name = SUGGESTED_TAGGER.split("/")[1]
    return (f"Download {MODEL_FILE} and {TAGS_FILE} of a WD14 tagger once, e.g. "
            f"'hf download {SUGGESTED_TAGGER} {MODEL_FILE} {TAGS_FILE} --local-dir {Path(folder) / name}' "
            f"(or from https://huggingface.co/{SUGGESTED_TAGGER}), then choose that folder.")


def _normal(tag: str) -> str:
    return tag.strip().replace("_", " ").casefold()


def _looks_like_hub_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "~")) and "\\" not in text


def _from_hub(repo_id: str) -> tuple[Path, Path]:
    try:
        from huggingface_hub import hf_hub_download

        return (Path(hf_hub_download(repo_id, MODEL_FILE)), Path(hf_hub_download(repo_id, TAGS_FILE)))
    except Exception as exc:  # offline, unknown repo, no such file: all mean "get it another way"  # noqa: BLE001
        raise ModelLoadError(f"Cannot get the tagger {repo_id} from the hub ({type(exc).__name__}).",
                             hint="Connect to the internet once, or " + download_help()) from None


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise ModelLoadError("The tagger needs onnxruntime, which is not installed.",
                             hint="Install it: pip install 'lora-studio[tagger]' (onnxruntime-gpu for NVIDIA GPUs).") from None
    return onnxruntime
