"""Sample prompts in kohya's inline syntax: ``a zxq girl --n blurry --w 512 --h 768 --d 42 --l 7.5 --s 28``.

One prompt a line (a ``.txt`` file, or the strings of ``output.sample_prompts``); ``#`` starts a
comment line. The options are kohya's ``sample_prompts`` ones: ``--n`` negative prompt, ``--w``/``--h``
size, ``--d`` seed, ``--l`` CFG scale, ``--s`` steps, ``--ss`` sampler (an A1111 name the Generate tab
knows). Whatever a line leaves out comes from the run's defaults when it is rendered, so every
epoch's picture of one line is made with the same seed and settings.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from trainer.config.validation import MAX_TRAINING_SEED
from trainer.core.errors import ConfigError

_OPTION_SPLIT = re.compile(r"(?:^|\s+)--(?=[A-Za-z])")
_OPTIONS = "--n (negative), --w/--h (size), --d (seed), --l (CFG scale), --s (steps), --ss (sampler)"
SIZE_MULTIPLE = 8  # the VAE's scale factor of every supported family
MAX_SIDE = 4096  # px a side: twice SDXL's hires-fix sizes; beyond it one pass needs more memory than any consumer GPU has


@dataclass(frozen=True)
class SamplePrompt:
    """One line: the prompt and the settings it fixes (None / 0 = the run's default)."""

    prompt: str
    negative: str = ""
    width: int = 0
    height: int = 0
    seed: int | None = None
    cfg: float | None = None
    steps: int | None = None
    sampler: str | None = None

    def text(self) -> str:
        """The line back in kohya's syntax (what the GUI's rows and the run's config store)."""
        parts = [self.prompt]
        for flag, value in (("n", self.negative), ("w", self.width), ("h", self.height), ("d", self.seed),
                            ("l", self.cfg), ("s", self.steps), ("ss", self.sampler)):
            if value is not None and value != "" and not (flag in ("w", "h", "s") and value == 0):
                parts.append(f"--{flag} {value:g}" if isinstance(value, float) else f"--{flag} {value}")
        return " ".join(parts)

    def with_defaults(self, *, seed: int, width: int, height: int, cfg: float, steps: int, sampler: str) -> SamplePrompt:
        """Every setting filled in: this line's own, else the given defaults."""
        return replace(self, seed=seed if self.seed is None else self.seed, width=self.width or width,
                       height=self.height or height, cfg=cfg if self.cfg is None else self.cfg,
                       steps=self.steps or steps, sampler=self.sampler or sampler)


def parse_prompt_line(line: str, where: str = "prompt") -> SamplePrompt:
    """One line of kohya syntax; a bad option is a ConfigError naming ``where`` (e.g. 'prompts.txt line 3')."""
    pieces = _OPTION_SPLIT.split(line.strip())
    prompt, options = pieces[0].strip(), pieces[1:]
    if not prompt:
        raise ConfigError(f"{where}: the line has options but no prompt.", hint="Start the line with the prompt text.")
    values: dict[str, object] = {}
    for option in options:
        name, _, value = option.strip().partition(" ")
        value = value.strip()
        if name not in _PARSERS:
            raise ConfigError(f"{where}: unknown option --{name}.", hint=f"Use {_OPTIONS}.")
        if not value:
            raise ConfigError(f"{where}: --{name} needs a value.", hint=f"Write it as '--{name} VALUE'.")
        field_name, parse = _PARSERS[name]
        values[field_name] = parse(value, f"{where}: --{name}")
    return SamplePrompt(prompt, **values)


def parse_prompt_lines(lines: Iterable[str], source: str) -> list[SamplePrompt]:
    """Every non-empty, non-comment line; errors name ``source`` and the line number."""
    prompts = []
    for number, line in enumerate(lines, start=1):
        if line.strip() and not line.lstrip().startswith("#"):
            prompts.append(parse_prompt_line(line, f"{source} line {number}"))
    return prompts


def read_prompt_file(path: str | Path) -> list[SamplePrompt]:
    """The prompts of a kohya-style ``.txt`` prompt file."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise ConfigError(f"{path} is a folder, not a prompt file.", hint="Give a .txt file with one prompt a line.")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"Prompt file not found: {path}.", hint="Check the path, or give the prompts themselves.") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text.", hint="Save the prompt file as UTF-8.") from None
    prompts = parse_prompt_lines(text.splitlines(), path.name)
    if not prompts:
        raise ConfigError(f"The prompt file {path} has no prompts.", hint="Write one prompt a line.")
    return prompts


def sample_prompt_list(entries: Iterable[str]) -> list[SamplePrompt]:
    """``output.sample_prompts``: prompt lines, and/or paths of ``.txt`` prompt files."""
    prompts: list[SamplePrompt] = []
    for index, entry in enumerate(entries):
        if _is_prompt_file(entry):
            prompts.extend(read_prompt_file(entry))
        elif entry.strip():
            prompts.append(parse_prompt_line(entry, f"sample prompt {index + 1}"))
    return prompts


def _is_prompt_file(entry: str) -> bool:
    text = entry.strip()
    # a path that does not exist yet still reads as one (and fails with "not found") unless it has spaces
    return text.lower().endswith(".txt") and (Path(text).expanduser().is_file() or " " not in text)


def _whole(value: str, label: str, low: int = 1, high: int | None = None) -> int:
    try:
        number = int(value)
    except ValueError:
        raise ConfigError(f"{label} needs a whole number, got {value!r}.") from None
    if number < low or (high is not None and number > high):
        raise ConfigError(f"{label} = {number} is out of range.",
                          hint=f"Use {low} or more." if high is None else f"Use {low} to {high}.")
    return number


def _size(value: str, label: str) -> int:
    number = _whole(value, label, low=SIZE_MULTIPLE, high=MAX_SIDE)
    if number % SIZE_MULTIPLE:
        low = number // SIZE_MULTIPLE * SIZE_MULTIPLE
        raise ConfigError(f"{label} = {number} is not a multiple of {SIZE_MULTIPLE}.", hint=f"Use {low} or {low + SIZE_MULTIPLE}.")
    return number


def _cfg(value: str, label: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise ConfigError(f"{label} needs a number, got {value!r}.") from None
    if not math.isfinite(number) or number < 0:
        raise ConfigError(f"{label} = {value} is out of range.", hint="Use a CFG scale of 0 or more (7 is typical).")
    return number


def _sampler(value: str, label: str) -> str:
    from trainer.generate.schedulers import parse_sampler

    try:
        return parse_sampler(value).label
    except ConfigError as exc:
        raise ConfigError(f"{label}: {exc.message}", hint=exc.hint) from None


_PARSERS = {
    "n": ("negative", lambda value, label: value),
    "w": ("width", _size),
    "h": ("height", _size),
    "d": ("seed", lambda value, label: _whole(value, label, low=0, high=MAX_TRAINING_SEED)),
    "l": ("cfg", _cfg),
    "s": ("steps", _whole),
    "ss": ("sampler", _sampler),
}
