"""What a training run *is*: typed, frozen dataclasses with defaults and one validation pass.

The engine only ever sees a validated ``StudioConfig``; widget values, TOML dicts and argparse
namespaces are turned into one here (``config_from_dict``) and nowhere else. Field names are
unique across sections so that every field is also a CLI flag (``rank`` -> ``--rank``,
``te_lr`` -> ``--te-lr``) without ambiguity.

TOML layout: one table per section (``[model]``, ``[data]``, ``[network]``, ``[optim]``,
``[train]``, ``[output]``); presets are sparse files of the same shape.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import tomli_w
import tomllib

from trainer.core.errors import ConfigError

TargetSet = Literal["cross-attn", "attn", "full"]
Precision = Literal["auto", "fp32", "fp16", "bf16"]
ExportDtype = Literal["fp16", "bf16", "fp32"]
OptimizerName = Literal["adamw", "adamw8bit", "prodigy", "adafactor"]
SchedulerName = Literal["constant", "constant_with_warmup", "cosine", "linear", "cosine_with_restarts"]
PredictionType = Literal["auto", "epsilon", "v_prediction"]
LoraInit = Literal["kaiming", "gaussian"]
LossType = Literal["l2", "l1", "huber", "smooth_l1"]
HuberSchedule = Literal["constant", "exponential", "snr"]
TimestepSampling = Literal["uniform", "logit_normal", "range"]
NetworkType = Literal["lora", "dora", "locon", "loha", "lokr"]


@dataclass(frozen=True)
class ModelConfig:
    """Which base model to train on."""

    base: str = field(default="", metadata={"help": "Diffusers folder, single-file .safetensors checkpoint, or hub id."})
    base_config: str = field(default="", metadata={"help": "Diffusers-style config folder for a single-file checkpoint of an unusual architecture (default: the bundled config of the detected family)."})
    prediction_type: PredictionType = field(default="auto", metadata={"help": "Noise prediction target; 'auto' reads it from the model."})
    clip_skip: int = field(default=1, metadata={"help": "Use the text encoder's N-th last layer (1 = last, 2 = A1111 'clip skip 2')."})


@dataclass(frozen=True)
class DataConfig:
    """Where the pictures are and how they become training samples."""

    data: str = field(default="", metadata={"help": "Folder of images with .txt/.caption sidecars; kohya-style 'N_name' sub-folders repeat N times."})
    trigger: str = field(default="", metadata={"help": "Trigger word prepended to every caption (unless already present)."})
    default_caption: str = field(default="", metadata={"help": "Caption for images without a sidecar (the trigger word alone when empty)."})
    repeats: int = field(default=1, metadata={"help": "Repeats for images not inside an 'N_name' folder."})
    resolution: int = field(default=0, metadata={"help": "Training resolution in pixels; 0 = the base model's native size."})
    buckets: bool = field(default=True, metadata={"help": "Aspect-ratio bucketing: keep each image's shape instead of square-cropping."})
    min_bucket_side: int = field(default=256, metadata={"help": "Smallest bucket side in pixels."})
    max_bucket_side: int = field(default=0, metadata={"help": "Largest bucket side in pixels; 0 = twice the training resolution (1024 for SD 1.5, 2048 for SDXL)."})
    flip: bool = field(default=False, metadata={"help": "Random horizontal flip (off for asymmetric characters)."})
    shuffle_captions: bool = field(default=False, metadata={"help": "Shuffle comma-separated caption tags each step."})
    keep_tokens: int = field(default=1, metadata={"help": "Tags at the start of the caption kept in place when shuffling."})
    caption_dropout: float = field(default=0.0, metadata={"help": "Probability of training a step with an empty caption."})
    caption_prefix: str = field(default="", metadata={"help": "Text put before every caption, joined with a comma (kohya's caption_prefix; e.g. 'zxq, 1girl |||')."})
    caption_suffix: str = field(default="", metadata={"help": "Text put after every caption, joined with a comma."})
    keep_tokens_separator: str = field(default="|||", metadata={"help": "In a caption 'a, b ||| c, d', the tags before the separator stay first (after a second one, last); shuffling and tag dropout only touch the tags between. The separator itself is never trained; empty = off."})
    tag_dropout: float = field(default=0.0, metadata={"help": "Probability of leaving out each tag per step (0.1 typical); the trigger word and kept tags are never dropped."})
    masked_loss: bool = field(default=False, metadata={"help": "Learn only where a picture's mask is white: 'name.mask.png' beside it, else its alpha channel (black = ignored, grey = partly)."})
    reg_data: str = field(default="", metadata={"help": "Folder of regularization (class) pictures for prior preservation; 'N_name' sub-folders repeat N times. As many are drawn per epoch as there are training samples."})
    class_prompt: str = field(default="", metadata={"help": "Caption of regularization pictures without a caption file (e.g. 'a woman'; an 'N_name' folder's name otherwise)."})
    prior_loss_weight: float = field(default=1.0, metadata={"help": "Loss weight of the regularization pictures (kohya's prior_loss_weight)."})
    validation_split: float = field(default=0.0, metadata={"help": "Hold out this share of the pictures (e.g. 0.1), picked reproducibly from the seed and never trained on, to measure a validation loss; 0 = off."})
    validation_data: str = field(default="", metadata={"help": "Folder of held-out pictures (with captions) for the validation loss, instead of validation_split."})


@dataclass(frozen=True)
class NetworkConfig:
    """The LoRA itself: where it goes and how big it is."""

    rank: int = field(default=16, metadata={"help": "LoRA rank r (file size grows linearly with it)."})
    alpha: float = field(default=8.0, metadata={"help": "LoRA alpha; the update is scaled by alpha/rank."})
    targets: TargetSet = field(default="cross-attn", metadata={"help": "UNet layers: cross-attn (attn2), attn (attn1+attn2), full (all transformer Linear/1x1 incl. ff and proj_in/out)."})
    train_text_encoder: bool = field(default=True, metadata={"help": "Also train LoRA on the text encoder's q/k/v/out projections."})
    te_mlp: bool = field(default=False, metadata={"help": "Also train the text encoder's MLP fc1/fc2."})
    rslora: bool = field(default=False, metadata={"help": "Rank-stabilised scaling alpha/sqrt(rank)."})
    lora_init: LoraInit = field(default="kaiming", metadata={"help": "Initialisation of A (B is always zero)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA branch input (peft's lora_dropout)."})
    network_dropout: float = field(default=0.0, metadata={"help": "kohya's network_dropout: neuron dropout on the LoRA's r hidden values (after lora_down), training only; 0 = off, 0.1 typical."})
    rank_dropout: float = field(default=0.0, metadata={"help": "kohya's rank_dropout: drop each of the r ranks per sample with this probability (rest scaled by 1/(1-p)), training only; 0 = off."})
    module_dropout: float = field(default=0.0, metadata={"help": "kohya's module_dropout: skip a whole LoRA layer for a step with this probability (no rescaling), training only; 0 = off."})
    network: NetworkType = field(default="lora", metadata={"help": "Adapter type: lora, dora (LoRA + magnitude), locon (LoRA + the UNet's 3x3 convs), loha, lokr (LyCORIS)."})
    conv_rank: int = field(default=0, metadata={"help": "locon: rank of the UNet ResNet/sampler 3x3 convs (kohya's conv_dim); 0 = the network rank."})
    conv_alpha: float = field(default=0.0, metadata={"help": "locon: alpha of the 3x3 convs (kohya's conv_alpha); 0 = the network alpha."})
    block_dims: str = field(default="", metadata={"help": "kohya block_dims: one rank per UNet block (25 for SD1/SD2, 23 for SDXL), comma-separated; 0 leaves a block out; empty = rank everywhere."})
    block_alphas: str = field(default="", metadata={"help": "kohya block_alphas: one alpha per UNet block (as block_dims); empty = alpha everywhere."})
    block_lr: str = field(default="", metadata={"help": "Per-block learning-rate factors (as block_dims, kohya's block lr weights), comma-separated; empty = 1 everywhere."})


@dataclass(frozen=True)
class OptimConfig:
    """How the LoRA weights are updated."""

    optimizer: OptimizerName = field(default="adamw", metadata={"help": "adamw, adamw8bit (bitsandbytes), prodigy, adafactor."})
    lr: float = field(default=1e-4, metadata={"help": "Learning rate of the UNet LoRA."})
    te_lr: float = field(default=0.0, metadata={"help": "Learning rate of the text-encoder LoRA; 0 = half of lr."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay."})
    scheduler: SchedulerName = field(default="constant_with_warmup", metadata={"help": "Learning-rate schedule."})
    warmup_steps: int = field(default=0, metadata={"help": "Linear warm-up steps."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm; 0 = off."})
    grad_accum: int = field(default=1, metadata={"help": "Gradient accumulation steps per optimiser step."})
    lr_cycles: int = field(default=1, metadata={"help": "Cosine cycles of the cosine_with_restarts schedule: the learning rate restarts from its peak N-1 times."})
    loraplus_ratio: float = field(default=0.0, metadata={"help": "LoRA+: the B (lora_up) matrices learn this many times faster than A; 0 = off, 16 is the paper's choice."})
    ema_decay: float = field(default=0.0, metadata={"help": "Keep an EMA of the LoRA weights (fp32) and export/sample it; 0 = off, 0.999 typical. The decay ramps up as min(decay, (1+k)/(10+k)) at step k, as diffusers' EMAModel."})


@dataclass(frozen=True)
class TrainConfig:
    """How long and how the loop runs."""

    steps: int = field(default=0, metadata={"help": "Optimiser steps; 0 = derive from epochs."})
    epochs: int = field(default=10, metadata={"help": "Passes over images x repeats (used when steps is 0)."})
    batch_size: int = field(default=1, metadata={"help": "Images per step."})
    precision: Precision = field(default="auto", metadata={"help": "Frozen-weight precision: auto (fp16 on CUDA, fp32 on CPU), fp32, fp16, bf16. LoRA weights stay fp32."})
    grad_checkpointing: bool = field(default=False, metadata={"help": "Trade compute for memory (on a GPU it turns itself on when a run would not fit without it)."})
    compile: bool = field(default=False, metadata={"help": "Compile the UNet with torch.compile: faster GPU steps after a one-off compile of a few minutes (needs a C compiler)."})
    seed: int = field(default=42, metadata={"help": "Random seed for init, data order and noise."})
    min_snr_gamma: float = field(default=5.0, metadata={"help": "Min-SNR-gamma loss weighting; 0 = off."})
    noise_offset: float = field(default=0.0, metadata={"help": "Noise offset for darker/brighter images (0.05 typical)."})
    zero_terminal_snr: bool = field(default=False, metadata={"help": "Rescale the noise schedule to zero terminal SNR (v-prediction models only, e.g. NoobAI v-pred); samples use 'trailing' timesteps."})
    cache_latents: bool = field(default=True, metadata={"help": "Encode each image once and cache the latents on disk."})
    cache_text: bool = field(default=True, metadata={"help": "Cache text embeddings when the text encoder is frozen and captions are static."})
    device: str = field(default="auto", metadata={"help": "auto, cuda, cuda:N, mps or cpu."})
    loss: LossType = field(default="l2", metadata={"help": "Loss per latent value: l2 (MSE), l1, huber or smooth_l1 (robust to outliers; threshold from huber_schedule)."})
    huber_schedule: HuberSchedule = field(default="snr", metadata={"help": "Huber threshold c over timesteps (kohya): snr (small at noisy steps), exponential, or constant huber_c*huber_scale."})
    huber_c: float = field(default=0.1, metadata={"help": "Huber threshold parameter (kohya's huber_c), in (0, 1] for the snr and exponential schedules."})
    huber_scale: float = field(default=1.0, metadata={"help": "Scale of the Huber threshold for the exponential and constant schedules."})
    debiased_estimation: bool = field(default=False, metadata={"help": "Debiased estimation loss: weight each timestep by 1/sqrt(SNR) (v-prediction: 1/(SNR+1))."})
    scale_v_pred_loss_like_noise_pred: bool = field(default=False, metadata={"help": "v-prediction models: scale the loss by SNR/(SNR+1) so it weighs timesteps like epsilon loss."})
    v_pred_like_loss: float = field(default=0.0, metadata={"help": "Epsilon models: add this multiple of a v-prediction-like loss (loss*(SNR+1)/SNR); 0 = off."})
    timestep_sampling: TimestepSampling = field(default="uniform", metadata={"help": "Training timesteps: uniform over the schedule, range (uniform in [min_timestep, max_timestep)), or logit_normal (SD3: middle timesteps more often) within that range."})
    min_timestep: int = field(default=0, metadata={"help": "Smallest training timestep for range/logit_normal sampling (0-999)."})
    max_timestep: int = field(default=1000, metadata={"help": "Training timesteps stay below this for range/logit_normal sampling (1-1000)."})
    logit_mean: float = field(default=0.0, metadata={"help": "logit_normal sampling: mean of the normal before the sigmoid (negative = less noisy steps)."})
    logit_std: float = field(default=1.0, metadata={"help": "logit_normal sampling: standard deviation of the normal before the sigmoid."})
    multires_noise_iterations: int = field(default=0, metadata={"help": "Multires (pyramid) noise: levels of lower-resolution noise added; 0 = off, 6-10 typical."})
    multires_noise_discount: float = field(default=0.3, metadata={"help": "Multires noise: weight of level i is discount**i (kohya's default 0.3)."})
    ip_noise_gamma: float = field(default=0.0, metadata={"help": "Input perturbation noise: extra gamma*N(0,1) mixed into the noisy input but not the target; 0 = off, 0.1 typical."})


@dataclass(frozen=True)
class OutputConfig:
    """What the run writes and when."""

    output: str = field(default="output/lora.safetensors", metadata={"help": "Final LoRA file."})
    save_every: int = field(default=0, metadata={"help": "Write a resumable checkpoint every N steps; 0 = only at the end."})
    keep_last: int = field(default=3, metadata={"help": "Checkpoints kept (older ones are deleted)."})
    # On by default: a first run shows pictures (every 1-2 epochs of 20-50 pictures, 4-12 sets in a preset's run).
    sample_every: int = field(default=50, metadata={"help": "Make sample images every N steps; 0 = off."})
    sample_prompts: tuple[str, ...] = field(default=(), metadata={"help": "Prompts for sample images, or a .txt file of them, one a line, in kohya's syntax ('a zxq girl --n blurry --w 512 --h 768 --d 42 --l 7.5 --s 28'); the trigger word alone when empty."})
    sample_seed: int = field(default=1234, metadata={"help": "Seed of the sample images (fixed, so samples are comparable)."})
    sample_steps: int = field(default=20, metadata={"help": "Denoising steps per sample image."})
    sampler: str = field(default="DPM++ 2M", metadata={"help": "Sampler of the sample images, an A1111 name the Generate tab knows (e.g. 'Euler a', 'DPM++ 2M Karras')."})
    save_lora_every: int = field(default=0, metadata={"help": "Write a loadable LoRA every N epochs, named as kohya does (name-000004.safetensors), with samples; 0 = off."})
    save_lora_every_steps: int = field(default=0, metadata={"help": "Write a loadable LoRA every N steps (name-step00000500.safetensors); 0 = off."})
    keep_lora_last: int = field(default=0, metadata={"help": "Keep only the newest K epoch/step LoRA files (older ones are deleted); 0 = keep all."})
    validate_every: int = field(default=0, metadata={"help": "With validation pictures: compute the validation loss every N steps; 0 = at the end of every epoch."})
    check_export: bool = field(default=True, metadata={"help": "After export, render the first sample prompt from the written file as Generate loads it and warn if it differs from the in-training sample."})
    log_with: str = field(default="", metadata={"help": "Also log metrics and samples to 'tensorboard' (run folder/logs; needs the tensorboard extra); empty = off."})
    export_dtype: ExportDtype = field(default="fp16", metadata={"help": "dtype of the exported LoRA tensors."})
    export_peft: bool = field(default=False, metadata={"help": "Also write a PEFT folder 'name-peft/' next to the output (peft's save_pretrained layout per component, plus diffusers' pytorch_lora_weights.safetensors) for Python code; A1111/Forge/ComfyUI use the .safetensors file."})
    resume: str = field(default="", metadata={"help": "'auto' = latest checkpoint of this output, or a checkpoint folder."})
    ema_export_raw: bool = field(default=False, metadata={"help": "With ema_decay on: also write the raw (not averaged) weights as NAME.raw.safetensors."})
    sidecars: bool = field(default=True, metadata={"help": "Write A1111/Forge sidecars next to the output: name.json (trigger word as activation text, base model, notes; your edits are kept on re-export) and name.preview.png (the last sample of the first prompt)."})


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "network": NetworkConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
    "output": OutputConfig,
}


@dataclass(frozen=True)
class StudioConfig:
    """A whole training run: one instance of each section."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    @property
    def effective_te_lr(self) -> float:
        return self.optim.te_lr if self.optim.te_lr > 0 else self.optim.lr / 2

    @property
    def lora_scale(self) -> float:
        """The factor applied to B·A: alpha/r, or alpha/sqrt(r) for rsLoRA."""
        r = self.network.rank
        return self.network.alpha / (math.sqrt(r) if self.network.rslora else r)

    def replace(self, **overrides: Any) -> StudioConfig:
        """A copy with flat field overrides (``rank=8``), validated again."""
        return config_from_dict(merge_dicts(config_to_dict(self), nest_flat(overrides)))


def field_index() -> dict[str, tuple[str, dataclasses.Field]]:
    """Every field name -> (section, field). Names are unique across sections."""
    index: dict[str, tuple[str, dataclasses.Field]] = {}
    for section, cls in SECTIONS.items():
        for f in fields(cls):
            assert f.name not in index, f"duplicate config field {f.name}"
            index[f.name] = (section, f)
    return index


def nest_flat(flat: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{"rank": 8}`` -> ``{"network": {"rank": 8}}``; unknown names are a ConfigError."""
    index = field_index()
    nested: dict[str, dict[str, Any]] = {}
    for name, value in flat.items():
        if name not in index:
            raise ConfigError(f"Unknown setting '{name}'.", hint=_did_you_mean(name, index))
        nested.setdefault(index[name][0], {})[name] = value
    return nested


def merge_dicts(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Section-wise merge: later values win, sections are merged key by key."""
    merged = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def config_to_dict(config: StudioConfig) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for section in SECTIONS:
        values = dataclasses.asdict(getattr(config, section))
        out[section] = {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
    return out


def config_from_dict(data: dict[str, Any]) -> StudioConfig:
    """Build and validate a config from a TOML-shaped dict; errors name the field and the fix."""
    sections: dict[str, Any] = {}
    index = field_index()
    for key in data:
        if key not in SECTIONS:
            if key in index:
                hint = f"Put it under [{index[key][0]}]."
            else:
                hint = f"Valid sections: {', '.join(f'[{s}]' for s in SECTIONS)}."
            raise ConfigError(f"Unknown config section '{key}'.", hint=hint)
    for section, cls in SECTIONS.items():
        values = data.get(section, {}) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"[{section}] must be a table of settings, got {type(values).__name__}.")
        known = {f.name: f for f in fields(cls)}
        kwargs = {}
        for name, value in values.items():
            if name not in known:
                raise ConfigError(f"Unknown setting '{name}' in [{section}].", hint=_did_you_mean(name, index))
            kwargs[name] = _coerce(section, known[name], value)
        sections[section] = cls(**kwargs)
    config = StudioConfig(**sections)
    from trainer.config.validation import validate

    validate(config)
    return config


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML file into a dict; syntax errors name the file and line."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"Config file not found: {path}.", hint="Check the path.") from None
    except IsADirectoryError:
        raise ConfigError(f"{path} is a folder, not a config file.",
                          hint="Give the path of a .toml file (write one with 'lora-studio train --save-config run.toml').") from None
    except OSError as exc:
        raise ConfigError(f"Cannot read the config file {path}: {exc.strerror or exc}.", hint="Check its permissions.") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}.", hint="Fix the line it names.") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text.", hint="Save it as UTF-8.") from None


def save_toml(config: StudioConfig, path: str | Path) -> None:
    """Write the full config (every field) so a run can be repeated exactly."""
    from trainer.core.atomic import atomic_write_bytes

    atomic_write_bytes(Path(path), tomli_w.dumps(config_to_dict(config)).encode("utf-8"))


# --- helpers -------------------------------------------------------------------------------------


def _did_you_mean(name: str, index: dict[str, Any]) -> str:
    import difflib

    close = difflib.get_close_matches(name.replace("-", "_"), list(index), n=1)
    return f"Did you mean '{close[0]}'?" if close else "Run 'lora-studio train --help' for the list."


def _coerce(section: str, f: dataclasses.Field, value: Any) -> Any:
    """Check and convert one value to the field's declared type (TOML ints for floats are fine)."""
    hint = typing.get_type_hints(SECTIONS[section])[f.name]
    label = f"{section}.{f.name}"
    origin = typing.get_origin(hint)
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise ConfigError(f"{label} = {value!r} is not a valid choice.",
                              hint=f"Use one of: {', '.join(map(str, allowed))}.")
        return value
    if origin in (tuple, list) or hint is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{label} must be a list of strings, got {value!r}.")
        return tuple(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {"true", "false", "yes", "no", "1", "0", "on", "off"}:
            return value.lower() in {"true", "yes", "1", "on"}
        raise ConfigError(f"{label} must be true or false, got {value!r}.")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, (int, str, float)):
            raise ConfigError(f"{label} must be a whole number, got {value!r}.")
        try:
            as_float = float(value)
        except ValueError:
            raise ConfigError(f"{label} must be a whole number, got {value!r}.") from None
        if not as_float.is_integer():
            raise ConfigError(f"{label} must be a whole number, got {value!r}.")
        return int(as_float)
    if hint is float:
        if isinstance(value, bool):
            raise ConfigError(f"{label} must be a number, got {value!r}.")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{label} must be a number, got {value!r}.") from None
        if not math.isfinite(number):
            raise ConfigError(f"{label} must be a finite number, got {value!r}.")
        return number
    if hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{label} must be text, got {value!r}.")
        return str(value)
    if isinstance(hint, types.UnionType):  # pragma: no cover - no such fields today
        return value
    return value
