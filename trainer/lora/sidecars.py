"""A1111/Forge sidecars of a LoRA file: ``name.json`` (the card's "edit metadata" fields) and a preview.

A1111 and Forge read ``name.json`` next to ``name.safetensors`` (not ``name.safetensors.json``)
and write it from their Lora "edit metadata" dialog as ``json.dump(..., indent=4,
ensure_ascii=False)`` with six keys: ``description``, ``sd version`` (SD1, SD2, SDXL or Unknown;
an exact name overrides their own detection), ``activation text`` (added to the prompt when the
card is clicked: our trigger word), ``preferred weight`` (a JSON number; 0 = their default
multiplier), ``negative text`` and ``notes``. Keys they do not know survive their save.

Cards show ``name.<ext>`` or ``name.preview.<ext>``; we write ``name.preview.png`` and leave
``name.png`` to the user (A1111's "replace preview" writes that one, and it wins).

Re-exporting must not undo the user's edits, so the json also records a fingerprint of each value
LoRA Studio last wrote (under ``"lora studio"``): a key is replaced only if it is missing or still
holds that value.

The functions that keep sidecars in step with the file: ``write_sidecars`` (an export),
``copy_sidecars`` (a file copied, e.g. an epoch chosen as the output), ``move_sidecars`` (a run
renamed), ``remove_sidecars`` and ``derive_sidecars`` (resize/merge outputs, from their inputs).
Every write is atomic.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from trainer.core.atomic import atomic_write_bytes, atomic_write_text, write_error
from trainer.lora.metadata import ExportInfo
from trainer.models.family import FAMILY_LABELS

SD_VERSIONS = {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL"}  # A1111's SdVersion member names
UNKNOWN_VERSION = "Unknown"
WRITTEN_KEY = "lora studio"  # the values LoRA Studio last wrote, to tell them from the user's edits
PREVIEW_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "gif")  # A1111/Forge preview lookup
_DESCRIPTION_SUFFIXES = (".txt", ".description.txt")  # A1111's description files


@dataclass(frozen=True)
class Sidecar:
    """The six fields of A1111's Lora "edit metadata" dialog."""

    description: str = ""
    sd_version: str = UNKNOWN_VERSION
    activation_text: str = ""
    preferred_weight: float = 0.0
    negative_text: str = ""
    notes: str = ""

    def user_metadata(self) -> dict[str, object]:
        """The dialog's dict, in its key order."""
        return {"description": self.description, "sd version": self.sd_version,
                "activation text": self.activation_text, "preferred weight": float(self.preferred_weight),
                "negative text": self.negative_text, "notes": self.notes}


def sidecar_for_export(info: ExportInfo) -> Sidecar:
    """What a training run's card says: trigger word, base model, and how it was trained."""
    label = FAMILY_LABELS.get(info.family, info.family)
    images = sum(int(d.get("img_count", 0)) for d in info.dataset_dirs.values())
    description = f"{label} LoRA trained with LoRA Studio" + (f" on {images} images" if images else "") + "."
    notes = (f"Base model: {info.base_model_name or 'unknown'}. Rank {info.rank}, alpha {info.alpha:g}"
             f"{' (rsLoRA)' if info.rslora else ''}, layers: {info.targets}"
             f"{', text encoder too' if info.train_text_encoder else ''}. {info.steps} steps "
             f"(epoch {info.epoch}), learning rate {info.learning_rate:g}, seed {info.seed}.")
    return Sidecar(description=description, sd_version=SD_VERSIONS.get(info.family, UNKNOWN_VERSION),
                   activation_text=info.trigger_phrase.strip(), notes=notes)


def sidecar_from_header(metadata: Mapping[str, str], family: str | None) -> Sidecar:
    """A card for a LoRA without a json: trigger phrase and base model from its header."""
    return Sidecar(sd_version=SD_VERSIONS.get(family or "", UNKNOWN_VERSION),
                   activation_text=metadata.get("modelspec.trigger_phrase", "").strip(),
                   description=metadata.get("modelspec.description", ""))


def json_path(lora: str | Path) -> Path:
    """``name.safetensors`` -> ``name.json``, as A1111 names it."""
    return Path(lora).with_suffix(".json")


def preview_path(lora: str | Path) -> Path:
    lora = Path(lora)
    return lora.with_name(f"{lora.stem}.preview.png")


def sidecar_files(lora: str | Path) -> list[Path]:
    """The existing files A1111/Forge treat as belonging to ``lora``: json, previews, descriptions."""
    lora = Path(lora)
    names = [".json", *_DESCRIPTION_SUFFIXES]
    for ext in PREVIEW_EXTENSIONS:
        names += [f".{ext}", f".preview.{ext}"]
    return [path for suffix in names if (path := lora.with_name(lora.stem + suffix)).is_file()]


def read_user_metadata(lora: str | Path) -> dict:
    """``name.json`` as a dict; {} when there is none or it is not a JSON object (as A1111 does)."""
    return _read_json(json_path(lora)) or {}


def merge_user_metadata(existing: Mapping, ours: Mapping[str, object]) -> dict:
    """``existing`` with each of ``ours`` where the user has not changed it since LoRA Studio wrote it.

    A key that is missing, or still holds what LoRA Studio last wrote there (the fingerprints under
    ``WRITTEN_KEY``), takes our new value; every other key is the user's and is kept.
    """
    last = existing.get(WRITTEN_KEY)
    last = last if isinstance(last, Mapping) else {}
    merged = {k: v for k, v in existing.items() if k != WRITTEN_KEY}
    for key, value in ours.items():
        if key not in existing or last.get(key) == _fingerprint(existing[key]):
            merged[key] = value
    merged[WRITTEN_KEY] = {key: _fingerprint(value) for key, value in ours.items()}  # last: dialog keys first
    return merged


def write_sidecars(lora: str | Path, sidecar: Sidecar, preview: str | Path | None = None) -> list[Path]:
    """Write (or update) ``name.json`` and, from the image ``preview``, ``name.preview.png``.

    Fields the user edited since the last write (in A1111 or by hand) are kept. Returns the paths written.
    """
    lora = Path(lora)
    written = [_write_json(lora, merge_user_metadata(_existing(lora), sidecar.user_metadata()))]
    if preview is not None:
        target = preview_path(lora).with_suffix(Path(preview).suffix.lower() or ".png")
        atomic_write_bytes(target, Path(preview).read_bytes())
        written.append(target)
    return written


def copy_sidecars(src_lora: str | Path, dst_lora: str | Path) -> list[Path]:
    """Give ``dst_lora`` the sidecars of ``src_lora`` (renamed to its stem); returns the paths written.

    A json that ``dst_lora`` already has is merged into (its user edits stay); other sidecars of
    ``src_lora`` replace ``dst_lora``'s of the same kind. Sidecars ``src_lora`` lacks are left alone.
    """
    src, dst = Path(src_lora), Path(dst_lora)
    written = []
    for path in sidecar_files(src):
        target = dst.with_name(dst.stem + path.name[len(src.stem):])
        if target.resolve() == path.resolve():
            continue
        if path == json_path(src):
            theirs = read_user_metadata(src)
            record = theirs.pop(WRITTEN_KEY, {})
            existing = _existing(dst)
            merged = merge_user_metadata(existing, theirs) if existing else dict(theirs)
            merged[WRITTEN_KEY] = record  # what LoRA Studio wrote of these values, if anything
            written.append(_write_json(dst, merged))
        else:
            atomic_write_bytes(target, path.read_bytes())
            written.append(target)
    return written


def move_sidecars(src_lora: str | Path, dst_lora: str | Path) -> list[Path]:
    """``copy_sidecars`` and then delete ``src_lora``'s (a renamed run); returns the paths written."""
    if Path(src_lora).resolve() == Path(dst_lora).resolve():
        return []
    written = copy_sidecars(src_lora, dst_lora)
    keep = {p.resolve() for p in written}
    for path in sidecar_files(src_lora):
        if path.resolve() not in keep:
            path.unlink(missing_ok=True)
    return written


def remove_sidecars(lora: str | Path) -> None:
    """Delete the sidecars of ``lora`` (a deleted run)."""
    for path in sidecar_files(lora):
        path.unlink(missing_ok=True)


def derive_sidecars(out_lora: str | Path, sources: Sequence[tuple[str | Path, Mapping[str, str], str | None]],
                    note: str, description: str = "") -> list[Path]:
    """Sidecars of a file made from others (resize: one source; merge: several).

    ``sources`` are (LoRA path, its header metadata, its family). Each source's json is used when
    it has one, its header otherwise. The activation texts are joined (each once), the base model
    is the sources' common one, ``note`` goes first in the notes, and the first source's preview
    is copied. ``description`` defaults to the first source's.
    """
    cards = []
    for path, metadata, family in sources:
        header = sidecar_from_header(metadata, family).user_metadata()
        cards.append({**header, **{k: v for k, v in read_user_metadata(path).items() if k in header}})
    triggers = [str(card["activation text"]).strip() for card in cards]
    versions = {card["sd version"] for card in cards}
    notes = "\n\n".join([note] + [str(card["notes"]) for card in cards[:1] if card["notes"]])
    sidecar = Sidecar(
        description=description or str(cards[0]["description"]),
        sd_version=versions.pop() if len(versions) == 1 else UNKNOWN_VERSION,
        activation_text=", ".join(dict.fromkeys(t for t in triggers if t)),
        preferred_weight=_number(cards[0]["preferred weight"]) if len(cards) == 1 else 0.0,
        negative_text=", ".join(dict.fromkeys(str(c["negative text"]).strip() for c in cards if c["negative text"])),
        notes=notes,
    )
    preview = _preview_of(Path(sources[0][0])) if sources else None
    return write_sidecars(out_lora, sidecar, preview)


# --- helpers -------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict | None:
    """The json object in ``path``; None when it is missing or not a JSON object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _existing(lora: Path) -> dict:
    """The json to merge into; an unreadable one is kept as ``name.json.bak`` rather than lost."""
    path = json_path(lora)
    if not path.is_file():
        return {}
    data = _read_json(path)
    if data is None:
        try:
            os.replace(path, path.with_name(path.name + ".bak"))
        except OSError as exc:
            raise write_error(path, exc) from None
    return data or {}


def _write_json(lora: Path, data: Mapping) -> Path:
    path = json_path(lora)
    atomic_write_text(path, json.dumps(data, indent=4, ensure_ascii=False))  # A1111's own format
    return path


def _preview_of(lora: Path) -> Path | None:
    """The picture A1111 shows on the card: ``name.<ext>`` before ``name.preview.<ext>``."""
    for ext in PREVIEW_EXTENSIONS:
        for candidate in (lora.with_name(f"{lora.stem}.{ext}"), lora.with_name(f"{lora.stem}.preview.{ext}")):
            if candidate.is_file():
                return candidate
    return None


def _fingerprint(value: object) -> str:
    """A short hash of a json value: enough to tell whether the user changed it, without a second copy."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode("utf-8")).hexdigest()[:12]


def _number(value: object) -> float:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return 0.0
