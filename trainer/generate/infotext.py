"""A1111-style generation parameters ("infotext"): write, parse, and carry them in PNG files.

The text is what A1111 stores in a PNG's ``parameters`` text chunk and shows in PNG Info:

    zxq girl reading in a cafe <lora:mychar:0.8> <lora:watercolor:0.4>
    Negative prompt: blurry
    Steps: 25, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 7, Size: 512x512,
    Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Lora hashes: "mychar: 0123456789ab, watercolor: ..."

(the last part is one line). Values containing ``,``, ``:`` or a newline are JSON-quoted, as A1111
does; the parser is A1111's own algorithm (``parse_generation_parameters``), so files from A1111,
Forge or ComfyUI's A1111-compatible nodes read back too.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from trainer.core.atomic import atomic_path

PNG_KEY = "parameters"

# A1111: modules/infotext_utils.py (re_param_code, re_imagesize).
_RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_RE_SIZE = re.compile(r"^(\d+)x(\d+)$")
_RE_LORA_TAG = re.compile(r"<(?:lora|lyco):([^>]+)>", re.IGNORECASE)


@dataclass(frozen=True)
class LoraTag:
    """``<lora:name:te[:unet][:lbw=...]>`` as A1111 (and its block-weight extension) write it."""

    name: str
    te: float = 1.0
    unet: float | None = None  # None: same as te
    lbw: str = ""  # LoRA Block Weight vector or preset name; "" = all blocks at 1

    @property
    def unet_weight(self) -> float:
        return self.te if self.unet is None else self.unet

    def text(self) -> str:
        parts = [self.name, _number(self.te)]
        if self.unet is not None and self.unet != self.te:
            parts.append(_number(self.unet))
        if self.lbw:
            parts.append(f"lbw={self.lbw}")
        return f"<lora:{':'.join(parts)}>"


@dataclass(frozen=True)
class Infotext:
    """The parameters of one generated image."""

    prompt: str
    negative_prompt: str = ""
    steps: int = 20
    sampler: str = "Euler a"
    schedule_type: str = ""  # "" = not written (pre-1.9 A1111 put it inside the sampler name)
    cfg_scale: float = 7.0
    seed: int = -1
    width: int = 512
    height: int = 512
    model_hash: str = ""
    model: str = ""
    lora_hashes: dict[str, str] = field(default_factory=dict)  # LoRA name -> 12 hex digits
    extra: dict[str, str] = field(default_factory=dict)  # any other "Key: value" (Clip skip, Version, ...)

    def to_text(self) -> str:
        params: dict[str, str] = {"Steps": str(self.steps), "Sampler": self.sampler}
        if self.schedule_type:
            params["Schedule type"] = self.schedule_type
        params.update({"CFG scale": _number(self.cfg_scale), "Seed": str(self.seed),
                       "Size": f"{self.width}x{self.height}"})
        if self.model_hash:
            params["Model hash"] = self.model_hash
        if self.model:
            params["Model"] = self.model
        if self.lora_hashes:
            params["Lora hashes"] = ", ".join(f"{_hash_name(n)}: {h}" for n, h in self.lora_hashes.items())
        params.update(self.extra)
        lines = [self.prompt]
        if self.negative_prompt:
            lines.append(f"Negative prompt: {self.negative_prompt}")
        lines.append(", ".join(f"{key}: {_quote(value)}" for key, value in params.items()))
        return "\n".join(lines)

    @property
    def lora_tags(self) -> list[LoraTag]:
        return lora_tags(self.prompt)


def parse_infotext(text: str) -> Infotext:
    """Read A1111 generation parameters (as written by ``Infotext.to_text`` or by A1111 itself)."""
    *lines, last = text.strip().split("\n")
    if len(_RE_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    in_negative = False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        (negative_lines if in_negative else prompt_lines).append(line)
    params = {key.strip(): _unquote(value) for key, value in _RE_PARAM.findall(last)}

    width = height = 512
    if size := _RE_SIZE.match(params.pop("Size", "")):
        width, height = int(size.group(1)), int(size.group(2))
    return Infotext(
        prompt="\n".join(prompt_lines),
        negative_prompt="\n".join(negative_lines),
        steps=int(params.pop("Steps", 20)),
        sampler=params.pop("Sampler", "Euler a"),
        schedule_type=params.pop("Schedule type", ""),
        cfg_scale=float(params.pop("CFG scale", 7.0)),
        seed=int(params.pop("Seed", -1)),
        width=width,
        height=height,
        model_hash=params.pop("Model hash", ""),
        model=params.pop("Model", ""),
        lora_hashes=_parse_hashes(params.pop("Lora hashes", "")),
        extra=params,
    )


def lora_tags(prompt: str) -> list[LoraTag]:
    """Every ``<lora:...>`` tag in a prompt, in order (A1111 positional and named arguments)."""
    tags = []
    for match in _RE_LORA_TAG.finditer(prompt):
        name, *args = match.group(1).split(":")
        positional: list[float] = []
        named: dict[str, str] = {}
        for arg in args:
            key, sep, value = arg.partition("=")
            if sep:
                named[key.strip().lower()] = value.strip()
            else:
                positional.append(_float(arg))
        te = _float(named["te"]) if "te" in named else (positional[0] if positional else 1.0)
        unet = _float(named["unet"]) if "unet" in named else (positional[1] if len(positional) > 1 else None)
        tags.append(LoraTag(name.strip(), te, unet, named.get("lbw", "")))
    return tags


def strip_lora_tags(prompt: str) -> str:
    """The prompt the text encoder should see: tags removed, spaces tidied."""
    text = _RE_LORA_TAG.sub("", prompt)
    return "\n".join(" ".join(line.split()) for line in text.split("\n")).strip()


def save_png(image, path: str | Path, infotext: Infotext | str) -> Path:
    """Write ``image`` as PNG with the ``parameters`` chunk A1111's PNG Info reads (atomically)."""
    from PIL.PngImagePlugin import PngInfo

    text = infotext.to_text() if isinstance(infotext, Infotext) else infotext
    info = PngInfo()
    info.add_text(PNG_KEY, text)
    path = Path(path)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
    return path


def read_png_infotext(path: str | Path) -> str | None:
    """The ``parameters`` text of a PNG file, or None when it has none."""
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        return image.info.get(PNG_KEY)


# --- helpers -------------------------------------------------------------------------------------

def _number(value: float) -> str:
    """7.0 -> "7", 0.75 -> "0.75" (A1111 writes what the user typed; this is the shortest form)."""
    return f"{value:g}" if abs(value) >= 1e-4 or value == 0 else repr(value)


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return 1.0  # A1111 ignores arguments it cannot read


def _quote(value: str) -> str:
    # A1111: modules/infotext_utils.py quote()
    if "," not in value and "\n" not in value and ":" not in value:
        return value
    return json.dumps(value, ensure_ascii=False)


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _hash_name(name: str) -> str:
    # A1111 strips these so "name: hash, name: hash" stays parseable.
    return name.replace(":", "").replace(",", "")


def _parse_hashes(text: str) -> dict[str, str]:
    hashes: dict[str, str] = {}
    for item in text.split(","):
        name, sep, digest = item.rpartition(":")
        if sep and name.strip():
            hashes[name.strip()] = digest.strip()
    return hashes
