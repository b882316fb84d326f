"""Which base model a file or folder holds, from cheap metadata, before any weight is read.

The family (SD1 / SD2 / SDXL) comes from a diffusers folder's configs or from the tensor names
in a single file's header, so an unsupported model is refused in milliseconds, not after loading
7 GB, and sizes can be worked out for a model that is never loaded. A single file's prediction
type comes from a ``v_pred`` marker or, for SD 2.x, from one small tensor (ComfyUI's test).
The bundled diffusers configs of each family live in ``trainer/models/configs/``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from trainer.core.errors import ModelLoadError

Family = Literal["sd1", "sd2", "sdxl"]
PredictionType = Literal["epsilon", "v_prediction"]

MODEL_CONFIGS_DIR = Path(__file__).parent / "configs"
TOKENIZER_DIR = MODEL_CONFIGS_DIR / "clip_tokenizer"  # the real CLIP BPE vocabulary (every family uses it)
BUNDLED_CONFIGS: dict[str, Path] = {
    "sd1": MODEL_CONFIGS_DIR / "sd15",
    "sd2": MODEL_CONFIGS_DIR / "sd2",
    "sdxl": MODEL_CONFIGS_DIR / "sdxl",
}
FAMILY_LABELS = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}

# ComfyUI's test for SD2 v-prediction weights: this bias is much wider in the 768 v-model.
SD2_V_PROBE_KEY = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"
SD2_V_PROBE_STD = 0.09


def detect_family_from_configs(unet_config: Mapping[str, Any], text_encoder_config: Mapping[str, Any] | None,
                               has_text_encoder_2: bool) -> Family:
    """SD1/SD2/SDXL from structure, so tiny test models are classified like real ones."""
    if has_text_encoder_2 or unet_config.get("addition_embed_type") == "text_time":
        return "sdxl"
    open_clip_te = text_encoder_config is not None and text_encoder_config.get("hidden_act") == "gelu"
    if open_clip_te or unet_config.get("cross_attention_dim") == 1024:
        return "sd2"
    return "sd1"


def detect_family_from_checkpoint_keys(keys: Iterable[str]) -> Family:
    """SD1/SD2/SDXL from the tensor names of an LDM-layout single file."""
    keys = list(keys)
    if any(k.startswith("conditioner.embedders.1.") for k in keys):
        return "sdxl"
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "sd2"
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return "sd1"
    if any(k.startswith(("lora_", "lora_unet_", "lora_te")) or ".lora_" in k for k in keys):
        raise ModelLoadError("This file is a LoRA, not a base model.",
                             hint="Use a full Stable Diffusion checkpoint as the base model; load LoRAs in the Generate tab.")
    if any(k.startswith(("down_blocks.", "encoder.down_blocks.", "text_model.", "encoder.layers.")) for k in keys):
        raise ModelLoadError("This file is one component of a diffusers model folder, not a whole checkpoint.",
                             hint="Set base to the folder that contains model_index.json.")
    if any(k.startswith("model.diffusion_model.") for k in keys):
        raise ModelLoadError("This checkpoint has a UNet but no text encoder.",
                             hint="Use a full checkpoint (UNet, VAE and text encoder in one file) or a diffusers folder.")
    raise ModelLoadError("This file does not look like a Stable Diffusion checkpoint (no UNet or text-encoder weights).",
                         hint="Use an SD 1.x checkpoint in .safetensors format or a diffusers folder.")


# --- single files ------------------------------------------------------------------------------

def read_safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from the checked header alone (``trainer.core.safetensors_header``):
    a truncated, overlapping or non-safetensors file is a clear error before any tensor is read."""
    from trainer.core.safetensors_header import read_safetensors_header

    try:
        header, _ = read_safetensors_header(path, ModelLoadError)
    except OSError as exc:
        raise ModelLoadError(f"Could not read {path}: {exc.strerror or exc}.", hint="Check the file's permissions.") from None
    return {key: tuple(info["shape"]) for key, info in header.items()}


def guess_single_file_prediction(path: Path, shapes: Mapping[str, Sequence[int]], family: Family) -> tuple[str, str] | None:
    """(prediction type, why) when the file itself says; None to fall back to the config."""
    if "v_pred" in shapes:
        return "v_prediction", "the checkpoint carries a 'v_pred' marker"
    if family == "sd2" and SD2_V_PROBE_KEY in shapes:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            spread = float(fh.get_tensor(SD2_V_PROBE_KEY).float().std(unbiased=False))
        if spread > SD2_V_PROBE_STD:
            return "v_prediction", "its weights look like the SD 2.x 768 px v-prediction model"
        return "epsilon", "its weights look like the SD 2.x 512 px base (epsilon) model"
    return None
