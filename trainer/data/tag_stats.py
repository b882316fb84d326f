"""The tag frequency table: how often each caption tag occurs, and which ones every caption has.

A tag in every caption never varies, so the LoRA cannot learn it apart from the trigger: it is
absorbed into what the trigger means (the trigger then brings it along, and prompting it alone
does little). That is right for traits of the character and wrong for things that should stay
promptable (a background, a pose), which the table points out.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from trainer.data.captions import split_tags


@dataclass(frozen=True)
class TagCount:
    tag: str
    captions: int  # captions it occurs in
    share: float  # of all captions, 0-1
    is_trigger: bool

    @property
    def in_every_caption(self) -> bool:
        return self.share >= 1.0


@dataclass(frozen=True)
class TagTable:
    rows: tuple[TagCount, ...]  # most frequent first
    num_captions: int
    trigger: str

    @property
    def absorbed(self) -> list[str]:
        """Tags other than the trigger that every caption has."""
        return [row.tag for row in self.rows if row.in_every_caption and not row.is_trigger]

    def note(self, row: TagCount) -> str:
        if row.is_trigger:
            return "the trigger word"
        if row.in_every_caption:
            return (f"in every caption: absorbed into the trigger \"{self.trigger}\"" if self.trigger else
                    "in every caption: the LoRA learns it as part of everything")
        if row.captions == 1 and self.num_captions >= 10:
            return "in one caption only"
        return ""

    def summary(self) -> str:
        """One paragraph for the Dataset tab and the CLI."""
        if not self.num_captions:
            return "No captions yet."
        distinct = len(self.rows)
        text = f"{distinct} different tags in {self.num_captions} captions."
        absorbed = self.absorbed
        if absorbed:
            listed = ", ".join(f'"{tag}"' for tag in absorbed[:8]) + (", …" if len(absorbed) > 8 else "")
            into = f'the trigger "{self.trigger}"' if self.trigger else "the LoRA as a whole (no trigger word is set)"
            text += (f" {len(absorbed)} appear in every caption ({listed}) and will be absorbed into {into}: "
                     "keep them if they describe the subject itself, remove them where they vary "
                     "(backgrounds, poses, clothes) so they stay promptable.")
        return text


def tag_table(captions: Iterable[str], trigger: str = "") -> TagTable:
    """Count each tag once per caption (case-insensitively; the first spelling seen is shown)."""
    counts: Counter[str] = Counter()
    spelling: dict[str, str] = {}
    total = 0
    for caption in captions:
        total += 1
        for key in {tag.casefold(): tag for tag in split_tags(caption)}.items():
            spelling.setdefault(key[0], key[1])
            counts[key[0]] += 1
    trig = trigger.strip().casefold()
    rows = tuple(TagCount(spelling[key], n, n / total, key == trig)
                 for key, n in sorted(counts.items(), key=lambda kv: (-kv[1], spelling[kv[0]].casefold())))
    return TagTable(rows, total, trigger.strip())
