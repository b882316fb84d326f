"""Caption text: reading sidecar files, tags, the trigger word, and what one training step sees.

A caption is one line of comma-separated tags. Sidecars (``name.txt``, ``name.caption``) are
read in whatever encoding they were saved in; the trigger word goes first unless already there;
per step a caption may be dropped (for CFG) or tag-shuffled behind its first ``keep_tokens`` tags.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

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
    for codec, fallback_name in attempts:
        try:
            return clean_caption(raw.decode(codec)), fallback_name
        except UnicodeDecodeError:
            continue
    raise AssertionError("latin-1 decodes any bytes")  # pragma: no cover


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


def process_caption(caption: str, *, shuffle: bool, keep_tokens: int, dropout: float,
                    rng: random.Random) -> str:
    """The caption one training step sees: maybe dropped, maybe tag-shuffled.

    Dropout (an empty caption with probability ``dropout``) teaches the unconditional branch
    that CFG needs; shuffling stops the model tying meaning to tag order. The first
    ``keep_tokens`` tags (the trigger, usually) stay in front so they keep their weight.
    """
    if dropout > 0 and rng.random() < dropout:
        return ""
    if not shuffle:
        return caption
    tags = split_tags(caption)
    head, tail = tags[:keep_tokens], tags[keep_tokens:]
    rng.shuffle(tail)
    return ", ".join(head + tail)
