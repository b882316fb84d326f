"""Extract a LoRA from two checkpoints: the truncated SVD of W_tuned − W_base, layer by layer.

The layers are the ones LoRA Studio trains (UNet transformer blocks: attention, feed-forward,
proj_in/out; text-encoder attention and MLP), so the file loads everywhere an export does.
Layers that did not change (a fine-tune that froze its text encoder) are left out and reported.
Each kept layer stores √σ in both factors with alpha = rank (scale 1), like ``resize``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.config.schema import ModelConfig
from trainer.core.errors import ModelLoadError
from trainer.core.output_paths import check_output_file
from trainer.lora.inject import text_encoder_target_modules, unet_target_modules
from trainer.lora.names import kohya_module_name
from trainer.lora.reading import LoraModule
from trainer.lora.writing import EXPORT_DTYPES, save_kohya_lora
from trainer.tools.resize import LayerResize, check_target, output_metadata, target_rank
from trainer.tools.svd import LowRankSVD

UNCHANGED = 1e-6  # a layer whose largest |ΔW| is below this (relative to |W|) did not change


@dataclass(frozen=True)
class ExtractReport:
    path: Path
    layers: tuple[LayerResize, ...]  # old_rank = min(out, in) of the layer
    unchanged: tuple[str, ...]  # layers left out: the two models agree there
    size_bytes: int

    @property
    def energy_kept(self) -> float:
        total = sum(layer.energy for layer in self.layers)
        return 1.0 if total == 0 else sum(layer.energy * layer.energy_kept for layer in self.layers) / total

    def text(self) -> str:
        ranks = sorted({layer.new_rank for layer in self.layers})
        rank_text = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}–{ranks[-1]} (per layer)"
        skipped = f"; {len(self.unchanged)} unchanged layers left out" if self.unchanged else ""
        return (f"Wrote {self.path} ({self.size_bytes / 1e6:.2f} MB): {len(self.layers)} layers at rank {rank_text}, "
                f"energy of the difference kept {self.energy_kept:.2%}{skipped}.")


def extract_lora(base: str, tuned: str, out: str | Path, *, rank: int | None = 32, energy: float | None = None,
                 targets: str = "full", base_config: str = "", dtype: str = "fp16") -> ExtractReport:
    """LoRA ≈ ``tuned`` − ``base`` at ``rank`` (or per-layer rank keeping ``energy``; both: rank caps)."""
    from trainer.models.loading import load_base_model

    check_target(rank, energy, required=True)
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"dtype must be one of {list(EXPORT_DTYPES)}")
    out = check_output_file(out, suffix=".safetensors", label="The extracted LoRA",
                            inputs=[("base model", base), ("fine-tuned model", tuned)])
    families = ("sd1", "sd2", "sdxl")
    original = load_base_model(ModelConfig(base=base, base_config=base_config), supported=families)
    finetuned = load_base_model(ModelConfig(base=tuned, base_config=base_config), supported=families)
    if original.family != finetuned.family:
        raise ModelLoadError(f"The two models are of different families ({original.family} and {finetuned.family}).",
                             hint="Extract from a fine-tune and the exact base model it was trained from.")
    modules, layers, unchanged = [], [], []
    for component, paths in _layers(original, targets).items():
        for path in paths:
            name = kohya_module_name(component, path, original.family)
            before = getattr(original, component).get_submodule(path).weight
            after = getattr(finetuned, component).get_submodule(path).weight
            if before.shape != after.shape:
                raise ModelLoadError(f"{component}.{path} has shape {tuple(before.shape)} in the base but "
                                     f"{tuple(after.shape)} in the tuned model.",
                                     hint="The two checkpoints are different architectures.")
            difference = (after.double() - before.double()).flatten(1)
            if difference.abs().max() <= UNCHANGED * before.abs().max().clamp_min(1e-12):
                unchanged.append(name)
                continue
            u, s, vh = torch.linalg.svd(difference, full_matrices=False)
            svd = LowRankSVD(u, s, vh)
            cap = min(len(s), rank) if rank is not None else len(s)
            new_rank = target_rank(svd, cap, energy)
            up, down = svd.factors(new_rank)
            if before.dim() == 4:
                up, down = up[:, :, None, None], down.reshape(new_rank, *before.shape[1:])
            modules.append(LoraModule(name, down.float(), up.float(), float(new_rank)))
            layers.append(LayerResize(name, len(s), new_rank, svd.energy, svd.energy_kept(new_rank)))
    if not modules:
        raise ModelLoadError("The two models have the same weights in every LoRA layer; there is nothing to extract.",
                             hint="Check that the second model is really the fine-tuned one.")
    ranks = sorted({m.rank for m in modules})
    metadata = output_metadata({}, original.family, out, ranks,
                                f"extracted by LoRA Studio from {finetuned.name} minus {original.name}")
    metadata["ss_sd_model_name"] = original.name
    size = save_kohya_lora(modules, metadata, out, dtype=dtype)
    return ExtractReport(out, tuple(layers), tuple(unchanged), size)


def _layers(model, targets: str) -> dict[str, list[str]]:
    layers = {"unet": unet_target_modules(model.unet, targets),
              "text_encoder": text_encoder_target_modules(model.text_encoder, include_mlp=True)}
    if model.text_encoder_2 is not None:
        layers["text_encoder_2"] = text_encoder_target_modules(model.text_encoder_2, include_mlp=True)
    return layers
