"""Load a frozen base Stable Diffusion model from any supported source.

Sources, tried in this order:

1. a diffusers folder (``model_index.json`` + one sub-folder per component);
2. a single-file ``.safetensors`` checkpoint in the original LDM layout (A1111/ComfyUI files),
   read through diffusers' ``from_single_file`` with a *local* config folder: the bundled one
   of the detected family (``trainer/models/configs/``) or ``ModelConfig.base_config``. Pickled
   checkpoints (``.ckpt``, ``.pt``, ``.bin``) are refused, never unpickled;
3. a hub id (``owner/name``): from the local Hugging Face cache when ``HF_HUB_OFFLINE`` is set,
   downloaded otherwise.

The family (SD1 / SD2 / SDXL) is detected from cheap metadata (configs or tensor names, see
``trainer.models.family``) before any weight is read, so an unsupported model is refused in
milliseconds, not after loading 7 GB.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from trainer.config.schema import ModelConfig
from trainer.core.errors import ModelLoadError
from trainer.core.safetensors_header import read_safetensors_header
from trainer.models.family import (
    BUNDLED_CONFIGS,
    FAMILY_LABELS,
    TOKENIZER_DIR,
    Family,
    PredictionType,
    detect_family_from_checkpoint_keys,
    detect_family_from_configs,
    guess_single_file_prediction,
    read_safetensors_shapes,
)

PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl"}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Only what training and sampling need: configs, tokenizers and safetensors weights (any shards).
HUB_PATTERNS = [
    "model_index.json",
    "*/config.json",
    "scheduler/*.json",
    "tokenizer*/*",
    "unet/diffusion_pytorch_model*.safetensors*",
    "vae/diffusion_pytorch_model*.safetensors*",
    "text_encoder*/model*.safetensors*",
]


@dataclass
class BaseModel:
    """A loaded, frozen base model and what the trainer needs to know about it."""

    family: Family
    prediction_type: PredictionType
    unet: Any  # diffusers.UNet2DConditionModel
    vae: Any  # diffusers.AutoencoderKL
    text_encoder: Any  # transformers.CLIPTextModel
    tokenizer: Any  # transformers.CLIPTokenizer
    noise_scheduler: Any  # diffusers.DDPMScheduler: the training schedule (betas, prediction type)
    source: str  # what the user passed
    name: str  # short display name: file stem, folder name or hub id
    scheduler_config: dict[str, Any]  # the model's own scheduler config, for inference schedulers
    text_encoder_2: Any | None = None  # transformers.CLIPTextModelWithProjection (SDXL)
    tokenizer_2: Any | None = None
    notes: tuple[str, ...] = field(default=())  # assumptions the user should know about

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.in_channels)

    @property
    def native_resolution(self) -> int:
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    @property
    def resolution_multiple(self) -> int:
        """Image sides must be multiples of this: every UNet down/up-sampling then divides evenly
        (VAE factor x 2^(levels-1)); never below 64 px, the step every SD tool buckets by."""
        levels = len(self.unet.config.down_block_types)
        return max(self.vae_scale_factor * 2 ** (levels - 1), 8 * self.vae_scale_factor)

    def text_encoders(self) -> list[Any]:
        return [te for te in (self.text_encoder, self.text_encoder_2) if te is not None]

    def tokenizers(self) -> list[Any]:
        return [tok for tok in (self.tokenizer, self.tokenizer_2) if tok is not None]


# --- public entry points ---------------------------------------------------------------------

def load_base_model(cfg: ModelConfig, *, dtype: torch.dtype = torch.float32,
                    supported: Collection[str] = ("sd1",)) -> BaseModel:
    """Load the base model named by ``cfg.base``, frozen (no gradients) and in eval mode."""
    source = cfg.base.strip()
    if not source:
        raise ModelLoadError("No base model given.",
                             hint="Set base to a diffusers folder or a .safetensors checkpoint (or a hub id when online).")
    path = Path(source).expanduser()
    if path.is_dir():
        model = _load_diffusers_folder(path, cfg, dtype, supported, name=path.resolve().name)
    elif path.is_file():
        model = _load_single_file(path, cfg, dtype, supported)
    elif HUB_ID.match(source) and not source.startswith((".", "~")):
        model = _load_from_hub(source, cfg, dtype, supported)
    else:
        raise ModelLoadError(f"Base model not found: {source}.",
                             hint="Check the path: it must be a diffusers folder (with model_index.json) or a .safetensors file.")
    for module in (model.unet, model.vae, *model.text_encoders()):
        module.requires_grad_(False)
        module.eval()
    return model


# --- source: diffusers folder ----------------------------------------------------------------

def _load_diffusers_folder(folder: Path, cfg: ModelConfig, dtype: torch.dtype, supported: Collection[str],
                           *, name: str, source: str | None = None) -> BaseModel:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    source = source or cfg.base
    if not (folder / "model_index.json").is_file():
        found = sorted(p.name for p in folder.glob("*.safetensors"))
        hint = (f"To use a single file, set base to the file itself, e.g. {folder / found[0]}." if found
                else "Point base at a diffusers model folder (it contains model_index.json, unet/, vae/, text_encoder/).")
        raise ModelLoadError(f"{folder} is not a diffusers model folder (no model_index.json).", hint=hint)
    index = _read_json(folder / "model_index.json")
    has_te2 = bool((index.get("text_encoder_2") or [None])[0])
    unet_config = _read_json(folder / "unet" / "config.json")
    te_config = _read_json(folder / "text_encoder" / "config.json")
    family = detect_family_from_configs(unet_config, te_config, has_te2)
    _require_supported(family, supported, source)
    scheduler_config = _read_json(folder / "scheduler" / "scheduler_config.json")

    def load(cls: Any, subfolder: str) -> Any:
        variant = _weights_variant(folder / subfolder)
        for weights in sorted((folder / subfolder).glob("*.safetensors")):
            read_safetensors_header(weights, ModelLoadError)  # offsets, sizes, pickles: before diffusers reads it
        try:
            return cls.from_pretrained(str(folder), subfolder=subfolder, dtype=dtype, local_files_only=True,
                                       variant=variant, use_safetensors=True)
        except (OSError, ValueError, RuntimeError) as exc:
            raise ModelLoadError(f"Could not load the {subfolder} of {folder}: {_first_line(exc)}",
                                 hint="The folder may be incomplete; download or convert it again.") from exc

    unet = load(UNet2DConditionModel, "unet")
    vae = load(AutoencoderKL, "vae")
    text_encoder = load(CLIPTextModel, "text_encoder")
    text_encoder_2 = load(CLIPTextModelWithProjection, "text_encoder_2") if family == "sdxl" else None
    tokenizer = _load_tokenizer(folder / "tokenizer", openclip_padding=family == "sd2")
    tokenizer_2 = _load_tokenizer(folder / "tokenizer_2", openclip_padding=True) if family == "sdxl" else None
    prediction_type, notes = _resolve_prediction_type(cfg, scheduler_config, guessed=None)
    return _assemble(family, prediction_type, unet, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2,
                     scheduler_config, source=source, name=name, notes=notes)


def _weights_variant(component: Path) -> str | None:
    """Which weight files to read: None (the standard name) or "fp16" when only those exist.

    Pickled weights (``.bin``) are refused like pickled single files.
    """
    names = [p.name for p in component.glob("*.safetensors*")]
    if not names and any(component.glob("*.bin")):
        raise ModelLoadError(
            f"{component} has only pickled .bin weights; LoRA Studio reads .safetensors only, because pickles can run "
            "arbitrary code.",
            hint="Re-save the model with safetensors (diffusers: pipe.save_pretrained(folder, safe_serialization=True)) "
                 "or use a .safetensors single file.")
    if not names or any(".fp16." not in n for n in names):
        return None
    return "fp16"


def _load_tokenizer(folder: Path, *, openclip_padding: bool) -> Any:
    """The folder's tokenizer if it has one, else the bundled CLIP BPE.

    SD2 and SDXL's second encoder use the same vocabulary but pad with "!" (id 0), as OpenCLIP did.
    """
    from transformers import CLIPTokenizer

    extra = {"pad_token": "!"} if openclip_padding else {}
    source = folder if folder.is_dir() and any(folder.iterdir()) else TOKENIZER_DIR
    try:
        return CLIPTokenizer.from_pretrained(str(source), **(extra if source == TOKENIZER_DIR else {}))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"Could not load the tokenizer in {source}: {_first_line(exc)}",
                             hint="Delete the broken tokenizer folder to use the bundled CLIP tokenizer.") from exc


# --- source: single .safetensors file --------------------------------------------------------

def _load_single_file(path: Path, cfg: ModelConfig, dtype: torch.dtype, supported: Collection[str]) -> BaseModel:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.loaders.single_file_utils import SingleFileComponentError

    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise ModelLoadError(
            f"{path.name} is a pickle checkpoint ({suffix}); LoRA Studio does not open pickles because they can run "
            "arbitrary code.",
            hint="Convert it to .safetensors once (for example with a trusted converter such as A1111's "
                 "'Checkpoint Merger' or kohya's convert script) and use that file.")
    if suffix != ".safetensors":
        raise ModelLoadError(f"Unsupported base model file type '{suffix or path.name}'.",
                             hint="Use a .safetensors checkpoint or a diffusers folder.")
    shapes = read_safetensors_shapes(path)
    family = detect_family_from_checkpoint_keys(shapes)
    _require_supported(family, supported, cfg.base)
    config_dir = Path(cfg.base_config).expanduser() if cfg.base_config else BUNDLED_CONFIGS[family]
    if not (config_dir / "model_index.json").is_file():
        raise ModelLoadError(f"base_config {config_dir} is not a diffusers config folder (no model_index.json).",
                             hint="Point base_config at a folder with model_index.json and each component's config.json, "
                                  "or leave it empty to use the bundled config.")

    # Tokenizers are passed in (the bundled configs hold none); optional parts are switched off.
    components: dict[str, Any] = {
        "tokenizer": _load_tokenizer(config_dir / "tokenizer", openclip_padding=family == "sd2"),
        "feature_extractor": None,
        "image_encoder": None,
    }
    if family == "sdxl":
        pipeline_cls = StableDiffusionXLPipeline
        components["tokenizer_2"] = _load_tokenizer(config_dir / "tokenizer_2", openclip_padding=True)
    else:
        pipeline_cls = StableDiffusionPipeline
        components["safety_checker"] = None
    try:
        pipe = pipeline_cls.from_single_file(str(path), config=str(config_dir), local_files_only=True, dtype=dtype,
                                             **components)
    except (OSError, ValueError, KeyError, RuntimeError, SingleFileComponentError) as exc:
        raise _single_file_error(path, family, config_dir, exc) from exc
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, part, None)
        missing = [n for n, p in module.named_parameters() if p.is_meta] if module is not None else []
        if missing:
            raise ModelLoadError(
                f"{path.name} has no weights for {len(missing)} tensors of the {part} (e.g. {missing[0]}): it does not "
                f"match the {FAMILY_LABELS[family]} config in {config_dir}.",
                hint="Set base_config to a diffusers config folder of the same architecture.")

    scheduler_config = dict(pipe.scheduler.config)
    guessed = guess_single_file_prediction(path, shapes, family)
    if guessed is None and not cfg.base_config and scheduler_config.get("prediction_type") == "v_prediction":
        guessed = ("v_prediction", f"the bundled {FAMILY_LABELS[family]} config is the 768 px v-prediction model")
    prediction_type, notes = _resolve_prediction_type(cfg, scheduler_config, guessed=guessed)
    if family == "sd2" and prediction_type == "epsilon" and pipe.unet.config.sample_size == 96:
        pipe.unet.register_to_config(sample_size=64)  # an epsilon SD2 model is a 512 px "base" model
    return _assemble(family, prediction_type, pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer,
                     getattr(pipe, "text_encoder_2", None), getattr(pipe, "tokenizer_2", None), scheduler_config,
                     source=cfg.base, name=path.stem, notes=notes)


def _single_file_error(path: Path, family: Family, config_dir: Path, exc: BaseException) -> ModelLoadError:
    return ModelLoadError(
        f"Could not load {path.name} as an {FAMILY_LABELS[family]} checkpoint with the config in {config_dir}: "
        f"{_first_line(exc)}",
        hint="If it is a model of an unusual architecture, set base_config to a matching diffusers config folder.")


# --- source: hub id --------------------------------------------------------------------------

def _load_from_hub(repo_id: str, cfg: ModelConfig, dtype: torch.dtype, supported: Collection[str]) -> BaseModel:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
    )

    offline = _hub_offline()
    local_hint = ("Point base at a local diffusers folder or a .safetensors file, or run once with internet access "
                  "(HF_HUB_OFFLINE unset) to download it into the Hugging Face cache.")
    try:
        folder = snapshot_download(repo_id, allow_patterns=HUB_PATTERNS, local_files_only=offline)
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as exc:
        where = "offline mode is on (HF_HUB_OFFLINE)" if offline else "the Hugging Face Hub could not be reached"
        raise ModelLoadError(f"'{repo_id}' is not a local path and is not in the local Hugging Face cache; {where}.",
                             hint=local_hint) from exc
    except HfHubHTTPError as exc:
        raise ModelLoadError(f"Could not download '{repo_id}' from the Hugging Face Hub: {_first_line(exc)}",
                             hint="Check the id (owner/name), accept the model's licence on its page if it is gated, "
                                  "or " + local_hint[0].lower() + local_hint[1:]) from exc
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"Could not get '{repo_id}' from the Hugging Face Hub: {_first_line(exc)}",
                             hint=local_hint) from exc
    return _load_diffusers_folder(Path(folder), cfg, dtype, supported, name=repo_id, source=repo_id)


def _hub_offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    return flag or bool(constants.HF_HUB_OFFLINE)


# --- shared helpers --------------------------------------------------------------------------

def _require_supported(family: Family, supported: Collection[str], source: str) -> None:
    if family not in supported:
        can = ", ".join(FAMILY_LABELS.get(f, f) for f in supported)
        raise ModelLoadError(f"{FAMILY_LABELS[family]} models are not supported for training yet ({source}).",
                             hint=f"Use an {can} base model.")


def _resolve_prediction_type(cfg: ModelConfig, scheduler_config: Mapping[str, Any],
                             guessed: tuple[str, str] | None) -> tuple[PredictionType, tuple[str, ...]]:
    if cfg.prediction_type != "auto":
        return cfg.prediction_type, ()
    if guessed is not None:
        kind, why = guessed
        return kind, (f"Using {kind} because {why}; set prediction_type if that is wrong.",)
    kind = scheduler_config.get("prediction_type", "epsilon")
    if kind not in ("epsilon", "v_prediction"):
        raise ModelLoadError(f"The model's scheduler uses prediction_type '{kind}', which training does not support.",
                             hint="Set prediction_type to epsilon or v_prediction.")
    return kind, ()


def _assemble(family: Family, prediction_type: PredictionType, unet: Any, vae: Any, text_encoder: Any,
              tokenizer: Any, text_encoder_2: Any, tokenizer_2: Any, scheduler_config: Mapping[str, Any], *,
              source: str, name: str, notes: tuple[str, ...]) -> BaseModel:
    from diffusers import DDPMScheduler

    scheduler_config = dict(scheduler_config)
    noise_scheduler = DDPMScheduler.from_config(scheduler_config, prediction_type=prediction_type)
    return BaseModel(family=family, prediction_type=prediction_type, unet=unet, vae=vae, text_encoder=text_encoder,
                     tokenizer=tokenizer, noise_scheduler=noise_scheduler, source=source, name=name,
                     scheduler_config=scheduler_config, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
                     notes=notes)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelLoadError(f"Missing {path.name} in {path.parent}.",
                             hint="The model folder is incomplete; download or convert it again.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{path} is not valid JSON ({exc}).", hint="Restore the file from the original model.") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
