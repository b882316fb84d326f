"""Caption text: reading sidecar files, tags, the trigger word, and what one training step sees.

A caption is one line of comma-separated tags. Sidecars (``name.txt``, ``name.caption``) are
read in whatever encoding they were saved in; ``compose_caption`` adds the prefix/suffix and the
trigger word (first unless already there) and resolves kohya's keep-tokens separator (``a |||
b, c``) into fixed tags; per step a caption may be dropped (for CFG), tag-shuffled and have tags
dropped, never touching its fixed tags or the trigger.
"""

from __future__ import annotations

import random
import re
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from trainer.core.errors import DatasetError

CAPTION_EXTENSIONS = (".txt", ".caption")  # first match wins


def read_caption_file(path: Path) -> tuple[str, str | None]:
    """A sidecar's text, cleaned, plus the name of the fallback encoding used (None for UTF-8).

    Captions written on Windows are often cp1252; decoding them as UTF-8 would crash, and
    silently dropping bytes would change the caption, so fall back and tell the user.
    """
    raw = path.read_bytes()
    attempts = [("utf-8-sig", None), ("cp1252", "Windows-1252"), ("latin-1", "Latin-1")]  # latin-1 never fails
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):  # Notepad's "Unicode" is UTF-16 with a BOM
        attempts.insert(0, ("utf-16", None))
    elif b"\0" in raw:  # no text encoding but UTF-16/32 puts NUL bytes in a caption
        return clean_caption(_utf16_without_bom(path, raw)), "UTF-16 (without a byte-order mark)"
    for codec, fallback_name in attempts:
        try:
            return clean_caption(raw.decode(codec)), fallback_name
        except UnicodeDecodeError:
            continue
    raise AssertionError("latin-1 decodes any bytes")  # pragma: no cover


def _utf16_without_bom(path: Path, raw: bytes) -> str:
    """UTF-16 text that lost its BOM (some tools and scripts write it so): the NULs of its ASCII
    characters sit at odd offsets (little-endian) or even ones (big-endian). Anything else with
    NUL bytes is not a caption: refused with the file named rather than trained on."""
    little = raw[1::2].count(0) >= raw[0::2].count(0)
    high_bytes = raw[1::2] if little else raw[0::2]  # NUL for every ASCII character: commas, spaces, Latin tags
    try:
        text = raw[: len(raw) // 2 * 2].decode("utf-16-le" if little else "utf-16-be").rstrip("\0")
    except UnicodeDecodeError:
        text = "\0"
    if 2 * high_bytes.count(0) < len(high_bytes) or any(ch < " " and ch not in "\t\r\n" for ch in text):
        raise DatasetError(f"{path.name} is not a text file: it holds NUL bytes (binary data or UTF-32).",
                           hint="Save the caption as UTF-8 text.")
    return text


def caption_sidecar(image: Path) -> Path:
    """The sidecar that holds ``image``'s caption: an existing .txt/.caption, else a new .txt."""
    for ext in CAPTION_EXTENSIONS:
        candidate = image.with_suffix(ext)
        if candidate.is_file():
            return candidate
    return image.with_suffix(CAPTION_EXTENSIONS[0])


def clean_caption(text: str) -> str:
    """One line of comma-separated tags: lines joined with ", ", outer spaces and commas stripped."""
    lines = (line.strip().strip(",").strip() for line in text.replace("\ufeff", "").splitlines())
    return ", ".join(line for line in lines if line)


def split_tags(caption: str) -> list[str]:
    """Comma-separated tags, stripped, empty ones dropped."""
    return [tag.strip() for tag in caption.split(",") if tag.strip()]


def has_trigger(caption: str, trigger: str) -> bool:
    """Whether ``trigger`` occurs as a whole word (case-insensitive, as CLIP lower-cases)."""
    if not trigger.strip():
        return False
    return re.search(rf"(?<!\w){re.escape(trigger.strip())}(?!\w)", caption, re.IGNORECASE) is not None


def with_trigger(caption: str, trigger: str) -> str:
    """Put the trigger first unless it already is one of the caption's tags."""
    trigger = trigger.strip()
    if not trigger:
        return caption
    if trigger.casefold() in (tag.casefold() for tag in split_tags(caption)):
        return caption
    return f"{trigger}, {caption}" if caption else trigger


@dataclass(frozen=True)
class ComposedCaption:
    """A caption as training reads it: the text (no separator left in it) and its fixed tags."""

    text: str
    keep_head: int  # tags at the start that never move or drop
    keep_tail: int = 0  # tags at the end that never move or drop (after a second separator)


def compose_caption(caption: str, *, trigger: str = "", prefix: str = "", suffix: str = "",
                    separator: str = "", keep_tokens: int = 0) -> ComposedCaption:
    """Prefix, caption and suffix joined with commas, the trigger first, the separator resolved.

    kohya's rule: when the text holds ``separator``, the tags before it are fixed (``keep_tokens``
    is then ignored) and, after a second one, so are the tags at the end; otherwise the first
    ``keep_tokens`` tags are fixed. The separator is removed, so the model never reads it. A
    trigger word that is missing goes in front, inside the fixed tags.
    """
    text = ", ".join(part for part in (clean_caption(prefix), caption, clean_caption(suffix)) if part)
    if not separator or separator not in text:
        return ComposedCaption(with_trigger(text, trigger), keep_tokens)
    parts = text.split(separator, 2)
    head, body = split_tags(parts[0]), split_tags(parts[1])
    tail = split_tags(parts[2].replace(separator, ",")) if len(parts) > 2 else []  # a third one is a typo
    trigger = trigger.strip()
    if trigger and trigger.casefold() not in (tag.casefold() for tag in head + body + tail):
        head = [trigger, *head]
    return ComposedCaption(", ".join(head + body + tail), len(head), len(tail))


def process_caption(caption: str, *, shuffle: bool, keep_tokens: int, dropout: float,
                    rng: random.Random, keep_tail: int = 0, tag_dropout: float = 0.0,
                    protected: Collection[str] = ()) -> str:
    """The caption one training step sees: maybe dropped, maybe tag-shuffled, maybe missing tags.

    Dropout (an empty caption with probability ``dropout``) teaches the unconditional branch
    that CFG needs; shuffling stops the model tying meaning to tag order; tag dropout (each
    tag left out with probability ``tag_dropout``) stops it leaning on any one tag. The first
    ``keep_tokens`` and last ``keep_tail`` tags stay where they are and are never dropped, and
    neither is any tag in ``protected`` (casefolded: the trigger word).
    """
    if dropout > 0 and rng.random() < dropout:
        return ""
    if not shuffle and tag_dropout <= 0:
        return caption
    tags = split_tags(caption)
    cut = max(keep_tokens, len(tags) - keep_tail) if keep_tail else len(tags)
    head, body, tail = tags[:keep_tokens], tags[keep_tokens:cut], tags[cut:]
    if shuffle:
        rng.shuffle(body)
    if tag_dropout > 0:
        body = [tag for tag in body if tag.casefold() in protected or rng.random() >= tag_dropout]
    return ", ".join(head + body + tail)
