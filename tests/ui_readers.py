"""What A1111, Forge and ComfyUI do with the files around a LoRA, re-implemented minimally for the tests.

Written from the behaviour described in /work/notes/metadata_shapes.md (A1111 1.10's
``read_metadata_from_safetensors``, the Lora extension's ``get_metadata_table``/``build_tags``,
``network.py``'s version detection and alias, the user-metadata json and preview lookup; Forge's
variants; ComfyUI's 1 MiB header limit), not copied from their code. Each function fails the way
the UI fails (an exception where the UI raises), so "no exception" in a test means "the UI shows it".
"""

from __future__ import annotations

import datetime
import html
import json
import os
from pathlib import Path

COMFYUI_MAX_HEADER = 1024 * 1024  # /view_metadata gives up above this
SD_VERSIONS = ("Unknown", "SD1", "SD2", "SDXL")  # A1111's SdVersion members
PREVIEW_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "gif")


def header_length(path: Path) -> int:
    return int.from_bytes(Path(path).read_bytes()[:8], "little")


def read_metadata(path: Path) -> dict:
    """A1111/Forge ``read_metadata_from_safetensors``: values starting with ``{`` are parsed as JSON."""
    with open(path, "rb") as fh:
        length = int.from_bytes(fh.read(8), "little")
        start = fh.read(2)
        assert length > 2 and start in (b'{"', b"{'"), f"{path} is not a safetensors file"
        header = json.loads(start + fh.read(length - 2))
    out = {}
    for key, value in header.get("__metadata__", {}).items():
        out[key] = value
        if isinstance(value, str) and value[:1] == "{":
            try:
                out[key] = json.loads(value)
            except ValueError:
                pass
    return out


def metadata_table(meta: dict) -> list[tuple[str, object]]:
    """The Lora "edit metadata" dialog's file table (A1111 and Forge agree on this part)."""
    table = []
    for key, label in (("ss_output_name", "Output name:"), ("ss_sd_model_name", "Model:"),
                       ("ss_clip_skip", "Clip skip:"), ("ss_network_module", "Kohya module:")):
        value = meta.get(key)
        if value is not None and str(value) != "None":
            table.append((label, html.escape(value)))  # a dict here raises, as in the UI
    started = meta.get("ss_training_started_at")
    if started:
        table.append(("Date trained:", datetime.datetime.fromtimestamp(float(started), datetime.timezone.utc)
                      .strftime("%Y-%m-%d %H:%M")))
    buckets = meta.get("ss_bucket_info")
    if buckets and "buckets" in buckets:
        counts: dict[str, int] = {}
        for bucket in buckets["buckets"].values():
            shown = f"{bucket['resolution'][1]}x{bucket['resolution'][0]}"  # height x width
            counts[shown] = counts.get(shown, 0) + int(bucket["count"])
        ordered = sorted(counts, key=counts.get, reverse=True)
        table.append(("Resolutions:" if len(ordered) > 1 else "Resolution:", ", ".join(ordered[:4])))
    images = sum(int(params.get("img_count", 0)) for params in meta.get("ss_dataset_dirs", {}).values())
    if images:
        table.append(("Dataset size:", images))
    return table


def build_tags(meta: dict) -> list[tuple[str, int]]:
    """The dialog's tag list (the older A1111 version: no guard, outside any try), most frequent first."""
    tags: dict[str, int] = {}
    for folder_tags in meta.get("ss_tag_frequency", {}).values():
        for tag, count in folder_tags.items():
            tags[tag.strip()] = tags.get(tag.strip(), 0) + int(count)
    return sorted(tags.items(), key=lambda item: item[1], reverse=True)


def a1111_sd_version(meta: dict) -> str:
    if str(meta.get("ss_base_model_version", "")).startswith("sdxl_"):
        return "SDXL"
    if str(meta.get("ss_v2", "")) == "True":
        return "SD2"
    return "SD1" if meta else "Unknown"


def forge_sd_version(meta: dict) -> str:
    architecture = meta.get("modelspec.architecture")
    if architecture == "stable-diffusion-xl-v1-base/lora":
        return "SDXL"
    if str(meta.get("ss_base_model_version", "")).startswith("sdxl_"):
        return "SDXL"
    if str(meta.get("ss_v2", "")) == "True":
        return "SD2"
    return "SD1" if architecture == "stable-diffusion-v1/lora" else "Unknown"


def forge_hash(path: Path, meta: dict) -> str:
    """Forge's LoRA hash: ``sshs_model_hash`` when present (else its own sha256 of the tensor bytes)."""
    import hashlib

    raw = Path(path).read_bytes()
    return meta.get("sshs_model_hash") or hashlib.sha256(raw[8 + header_length(path):]).hexdigest()


def alias(path: Path, meta: dict, all_files: list[tuple[Path, dict]]) -> str:
    """The name A1111/Forge put in ``<lora:...>``: ss_output_name unless forbidden or shared by two files."""
    name = meta.get("ss_output_name", Path(path).stem)
    shared = sum(1 for _, other in all_files if other.get("ss_output_name", None) == name) > 1
    return Path(path).stem if name.lower() in ("none", "addams") or shared else name


def ui_lora_listing(root: Path) -> list[Path]:
    """The LoRAs a UI lists from a folder: every .safetensors below it whose header has ss_* keys."""
    found = []
    for path in sorted(Path(root).rglob("*.safetensors")):
        if any(key.startswith("ss_") for key in read_metadata(path)):
            found.append(path)
    return found


def user_metadata(lora: Path) -> dict:
    """``get_user_metadata``: ``basename + '.json'`` loaded with json (errors: shown, then {})."""
    basename, _ = os.path.splitext(lora)
    try:
        with open(basename + ".json", encoding="utf8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return {}


def save_user_metadata(lora: Path, edits: dict) -> None:
    """The dialog's save: load the json dict, set the edited keys in place, dump it back."""
    data = user_metadata(lora) or {"description": ""}
    data.update(edits)
    basename, _ = os.path.splitext(lora)
    with open(basename + ".json", "w", encoding="utf8") as fh:
        json.dump(data, fh, indent=4, ensure_ascii=False)


def card_prompt(lora: Path, meta: dict, default_multiplier: float = 1.0) -> str:
    """What clicking the card adds to the prompt."""
    data = user_metadata(lora)
    weight = data.get("preferred weight", 0.0)
    prompt = f"<lora:{alias(lora, meta, [(lora, meta)])}:{weight if weight else default_multiplier}>"
    if data.get("activation text"):
        prompt += " " + data["activation text"]
    return prompt


def card_preview(lora: Path) -> Path | None:
    """``find_preview``: ``name.<ext>`` then ``name.preview.<ext>``."""
    stem = os.path.splitext(lora)[0]
    for ext in PREVIEW_EXTENSIONS:
        for candidate in (f"{stem}.{ext}", f"{stem}.preview.{ext}"):
            if os.path.isfile(candidate):
                return Path(candidate)
    return None
