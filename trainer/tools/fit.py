"""Does a LoRA fit a base model? Checked from the model's configs on the meta device, no weights loaded.

Generate and bake check a LoRA against the model they load; inspect, resize and merge read the
file alone. Given a base (``--base``) they run the same two checks: the file's family must be the
base's (``check_lora_fits``) and every layer's width must match the layer it adds to
(``trainer.generate.matching.match_lora``). Without a base, a file whose cross-attention widths
name a family (768 = SD 1.x, 1024 = SD 2.x, 2048 = SDXL) is checked against that family's bundled
layout, and the report says so; a file whose shapes name none (a tiny test model's) is not checked.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

from trainer.core.errors import LoraFileError
from trainer.generate.matching import layer_index, match_lora
from trainer.lora.reading import LoraFile, check_lora_fits
from trainer.lora.sizing import architecture_for, family_architecture

_CROSS_ATTN_WIDTH = {768: "sd1", 1024: "sd2", 2048: "sdxl"}


@dataclass(frozen=True)
class BaseFit:
    """What a LoRA was checked against, and how many of its layers fit."""

    against: str  # "tiny-sd1 (SD 1.x)" or "the bundled SD 1.x layout (...)"
    fitting: int
    unmatched: tuple[str, ...]  # layers the model has no counterpart for (ignored when loaded)

    def text(self) -> str:
        line = f"Checked against {self.against}: " + (f"{self.fitting} layers fit" if self.fitting != 1 else "1 layer fits")
        if self.unmatched:
            line += (f"; {len(self.unmatched)} have no such layer there and would be ignored "
                     f"(e.g. {self.unmatched[0]})")
        return line + "."


def check_fits(file: LoraFile, base: str | None = None, base_config: str = "") -> BaseFit | None:
    """Refuse ``file`` when it is for another family than ``base`` or a layer's width differs from it.

    Without ``base`` the family the file's cross-attention widths name is assumed (None: nothing checked).
    """
    if base:
        arch = architecture_for(base, base_config or None)
        check_lora_fits(file, arch.family)
        against = arch.label
    else:
        family = shape_family(file)
        if family is None:
            return None
        arch = family_architecture(family)
        against = f"the bundled {arch.label} layout (no base model given; the file's cross-attention widths say {arch.label})"
    model = SimpleNamespace(unet=arch.unet, text_encoder=arch.text_encoders["text_encoder"],
                            text_encoder_2=arch.text_encoders.get("text_encoder_2"), family=arch.family)
    try:
        match = match_lora(file, layer_index(model))
    except LoraFileError as exc:
        raise LoraFileError(f"{exc.message.rstrip('.')} (checked against {against}).", hint=exc.hint) from None
    return BaseFit(against, len(match.targets), match.unmatched)


def shape_family(file: LoraFile) -> str | None:
    """The family the UNet cross-attention key/value widths name, if they agree on one."""
    widths = {_CROSS_ATTN_WIDTH.get(module.out_in[1]) for name, module in file.modules.items()
              if name.startswith("lora_unet_") and name.endswith(("attn2_to_k", "attn2_to_v"))}
    known = widths - {None}  # an odd width among them is a misfit the check then names
    return known.pop() if len(known) == 1 else None
