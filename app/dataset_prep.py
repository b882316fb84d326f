"""What the Dataset tab's preparation panel does: auto-captions, the tag table, masks, reg pictures.

Plain functions of the studio and named values (the layout is ``app.tab_dataset_prep``); all the
work is the engine's (``trainer.data.captioning``, ``trainer.data.tag_stats``,
``trainer.data.masks``, ``trainer.generate.reg_images``). Models live in the project folder:
``models/taggers/<name>/`` (model.onnx + selected_tags.csv) and ``models/captioners/<name>/``.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from app.studio import Studio
from trainer.core.errors import DatasetError, StudioError

TAGGER, CAPTIONER = "Tagger (booru tags, WD14)", "Captioner (sentences: BLIP, Florence-2)"
TAG_HEADERS = ["Tag", "Captions", "Share", "Note"]
Progress = Callable[[float, str], None]  # (fraction done, text)


def models_dir(studio: Studio, kind: str) -> Path:
    return studio.projects.models_dir / ("taggers" if kind == TAGGER else "captioners")


def model_choices(studio: Studio, kind: str) -> list[str]:
    """Model folders found in the project (taggers: with model.onnx; captioners: with config.json)."""
    folder = models_dir(studio, kind)
    marker = "model.onnx" if kind == TAGGER else "config.json"
    if not folder.is_dir():
        return []
    return sorted(str(p) for p in folder.iterdir() if p.is_dir() and (p / marker).is_file())


def model_help(studio: Studio, kind: str) -> str:
    """Markdown under the model picker: what was found, or exactly what to download and where."""
    from trainer.data.captioning import captioner, tagger

    folder = models_dir(studio, kind)
    found = model_choices(studio, kind)
    if found:
        return f"{len(found)} model{'s' * (len(found) != 1)} in `{folder}`. A hub id also works when online."
    help_text = tagger.download_help(folder) if kind == TAGGER else captioner.download_help(folder)
    return (f"**No {'tagger' if kind == TAGGER else 'captioning model'} yet.** {help_text} "
            "After that one download everything works offline.")


def captioned_count(studio: Studio, dataset: str) -> int:
    from trainer.data.captioning.autocaption import existing_captions

    return sum(bool(c) for c in existing_captions(studio.projects.dataset_dir(dataset)).values())


@dataclass(frozen=True)
class CaptionSettings:
    """The panel's widgets, as the engine wants them."""

    kind: str
    model: str
    mode: str
    trigger: str
    general_threshold: float
    character_threshold: float
    blacklist: str
    max_tags: int
    rating_tags: bool
    keep_underscores: bool
    prompt: str
    batch_size: int


def caption_dataset(studio: Studio, dataset: str, settings: CaptionSettings, progress: Progress) -> str:
    """Caption the dataset's pictures; returns the status line (with undo hint)."""
    from trainer.data.captioning.autocaption import caption_folder

    folder = studio.projects.dataset_dir(dataset)
    if not str(settings.model or "").strip():
        raise StudioError("No model is chosen.", hint=model_help(studio, settings.kind).replace("**", ""))
    studio.projects.model_source(str(settings.model).strip(), "model")

    def on_progress(p) -> None:
        eta = "" if p.eta_s is None else f", about {format_eta(p.eta_s)} left"
        progress(p.done / max(p.total, 1), f"{p.done} of {p.total} pictures{eta}")

    # On a GPU a training run holds the memory: wait for it, as generation does.
    with studio.gpu_job(lambda run: progress(0.0, f"Waiting for the training run '{run.name}' to finish…")):
        progress(0.0, "Loading the model…")
        with studio.build_lock:
            model = open_model(settings)
        report = caption_folder(folder, model, mode=settings.mode, trigger=settings.trigger,
                                batch_size=max(1, int(settings.batch_size)), on_progress=on_progress)
    return report.text()


def open_model(settings: CaptionSettings):
    if settings.kind == TAGGER:
        from trainer.data.captioning.tagger import (
            TaggerSettings,
            open_tagger,
            parse_tag_list,
        )

        return open_tagger(settings.model, TaggerSettings(
            general_threshold=float(settings.general_threshold), character_threshold=float(settings.character_threshold),
            blacklist=parse_tag_list(settings.blacklist or ""), max_tags=int(settings.max_tags or 0),
            rating_tags=bool(settings.rating_tags), replace_underscores=not settings.keep_underscores))
    from trainer.data.captioning.captioner import TransformersCaptioner

    return TransformersCaptioner(settings.model, prompt=settings.prompt or "")


def undo_captions(studio: Studio, dataset: str) -> str:
    from trainer.data.captioning.autocaption import undo_last_captioning

    return undo_last_captioning(studio.projects.dataset_dir(dataset))


def tag_rows(studio: Studio, dataset: str, trigger: str) -> tuple[list[list[str]], str]:
    """The tag frequency table of the dataset's captions (as training reads them) and its summary."""
    from trainer.config.schema import DataConfig
    from trainer.data.scan import scan_dataset
    from trainer.data.tag_stats import tag_table

    if not str(dataset or "").strip():
        return [], ""
    try:
        scan = scan_dataset(DataConfig(data=str(studio.projects.dataset_dir(dataset)), trigger=str(trigger or "")))
    except DatasetError:
        return [], "No pictures yet."
    table = tag_table((item.caption for item in scan.items if item.caption), str(trigger or ""))
    rows = [[row.tag, str(row.captions), f"{row.share:.0%}", table.note(row)] for row in table.rows]
    return rows, table.summary()


def masked_thumbnail(studio: Studio, image: Path, side: int) -> Path | None:
    """A preview of ``image`` with the part its mask ignores shaded red; None when it has no mask."""
    from PIL import Image

    from trainer.data.images import image_info, load_image
    from trainer.data.masks import find_mask, load_mask

    try:
        source = find_mask(image, "")
        if source is None:
            return None
        stamps = [f"{p}:{p.stat().st_mtime_ns}:{p.stat().st_size}" for p in {image, source.path}]
        key = hashlib.sha1("|".join(sorted(stamps)).encode()).hexdigest()[:20]
        thumb = studio.projects.thumbs_dir / f"{key}-mask.webp"
        if thumb.is_file():
            return thumb
        mask = load_mask(source, image_info(image))
        if mask is None:
            return None
        picture = load_image(image)
        shade = Image.new("RGB", picture.size, (220, 40, 40))
        ignored = mask.point(lambda v: int((255 - v) * 0.7))  # black in the mask = mostly red here
        picture = Image.composite(shade, picture, ignored)
    except (StudioError, OSError):
        return None
    picture.thumbnail((side, side))
    thumb.parent.mkdir(parents=True, exist_ok=True)
    picture.save(thumb, "WEBP", quality=80)
    return thumb


def reg_folder(studio: Studio, class_prompt: str) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", str(class_prompt).casefold()).strip("-")[:40] or "class"
    return studio.projects.root / "reg" / slug


def make_reg_pictures(studio: Studio, base_choice: str, class_prompt: str, count: int, seed: int, steps: int,
                      negative: str, progress: Progress) -> str:
    """Render ``count`` class pictures from the base model into the project's ``reg/`` folder."""
    from trainer.generate.reg_images import RegImagesRequest, make_reg_images

    if not str(base_choice or "").strip():
        raise StudioError("No base model is chosen.", hint="Pick the model you will train on.")
    request = RegImagesRequest(str(class_prompt or ""), int(count or 0), seed=int(seed or 0), steps=int(steps or 0),
                               negative_prompt=str(negative or ""))
    folder = reg_folder(studio, request.class_prompt)

    def on_progress(p) -> None:
        eta = "" if p.eta_s is None else f", about {format_eta(p.eta_s)} left"
        progress(p.done / p.total, f"Picture {p.done} of {p.total}{eta}")

    with studio.gpu_job(lambda run: progress(0.0, f"Waiting for the training run '{run.name}' to finish…")):
        progress(0.0, "Loading the base model…")
        generator = studio.generator(base_choice)
        paths = make_reg_images(generator, request, folder, on_progress)
    return (f"Made {len(paths)} pictures of \"{request.class_prompt}\" in `{folder}` (with .txt captions). "
            f"To use them, put that folder in the Train tab: *More settings: Pictures and captions → Reg data*.")


def format_eta(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"
