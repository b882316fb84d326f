"""Widgets for every training setting, built from the config dataclasses' own types and help texts.

The form is a dict ``field name -> component``; handlers receive it as gradio dict inputs and
turn the values back into flat overrides (``{"rank": 8}``) that ``trainer.config.presets.resolve_config``
validates. Nothing here knows a setting by position, and a field added to the config appears in
the form with its help text without touching this module.
"""

from __future__ import annotations

import re
import typing
from dataclasses import dataclass
from typing import Any, Literal

import gradio as gr

from app.block_table import (
    BLOCK_FIELDS,
    BLOCK_TABLE,
    block_table_widget,
    fields_to_rows,
    rows_to_fields,
)
from trainer.config.schema import SECTIONS, StudioConfig, config_to_dict, field_index
from trainer.core.errors import ConfigError

# Set by the Train tab's own pickers (dataset, base model, run name, Resume button).
APP_OWNED = frozenset({"base", "data", "output", "resume"})

# Shown open at the top of the tab; everything else sits in one closed accordion per section.
ESSENTIALS = ("trigger", "resolution", "rank", "alpha", "targets", "train_text_encoder", "lr", "steps", "epochs",
              "batch_size", "sample_every", "sample_prompts", "save_every", "sample_steps", "seed",
              "save_lora_every", "validation_split")

SECTION_TITLES = {
    "model": "Base model details",
    "data": "Pictures and captions",
    "network": "LoRA size and placement",
    "optim": "Optimiser and learning rate",
    "train": "Training loop",
    "output": "Saving and sample images",
}

LABELS = {
    "lr": "Learning rate (UNet)",
    "te_lr": "Learning rate (text encoder)",
    "rank": "Rank",
    "alpha": "Alpha",
    "targets": "Layers to train",
    "train_text_encoder": "Train the text encoder too",
    "te_mlp": "Text encoder MLP too",
    "rslora": "rsLoRA scaling",
    "lora_init": "LoRA init",
    "lora_dropout": "LoRA dropout",
    "trigger": "Trigger word",
    "resolution": "Resolution (px)",
    "steps": "Steps",
    "epochs": "Epochs",
    "batch_size": "Batch size",
    "sample_every": "Sample images every N steps",
    "sample_prompts": "Sample prompts (one per line; kohya's --n --w --h --d --l --s)",
    "sampler": "Sampler of the samples",
    "save_lora_every": "Save a LoRA file every N epochs",
    "save_lora_every_steps": "Save a LoRA file every N steps",
    "keep_lora_last": "Epoch files to keep (0 = all)",
    "validation_split": "Validation pictures (share held out)",
    "validation_data": "Validation pictures folder",
    "validate_every": "Validation loss every N steps (0 = per epoch)",
    "check_export": "Re-render the written file to check it",
    "log_with": "Also log to (tensorboard)",
    "sample_steps": "Denoising steps per sample",
    "sample_seed": "Sample seed",
    "save_every": "Checkpoint every N steps",
    "keep_last": "Checkpoints to keep",
    "min_snr_gamma": "Min-SNR gamma",
    "max_grad_norm": "Gradient clip norm",
    "grad_accum": "Gradient accumulation",
    "grad_checkpointing": "Gradient checkpointing",
    "compile": "Compile the UNet (torch.compile)",
    "cache_latents": "Cache latents",
    "cache_text": "Cache text embeddings",
    "clip_skip": "CLIP skip",
    "base_config": "Config folder for a single-file model",
    "prediction_type": "Prediction type",
    "export_dtype": "Export precision",
    "export_peft": "Also write a PEFT folder (for Python code)",
    "sidecars": "A1111/Forge card files (.json, .preview.png)",
    "default_caption": "Caption for pictures without one",
    "min_bucket_side": "Smallest bucket side (px)",
    "max_bucket_side": "Largest bucket side (px)",
    "buckets": "Aspect-ratio buckets",
    "flip": "Random horizontal flip",
    "shuffle_captions": "Shuffle caption tags",
    "keep_tokens": "Tags kept in place when shuffling",
    "caption_dropout": "Caption dropout",
    "noise_offset": "Noise offset",
    "weight_decay": "Weight decay",
    "warmup_steps": "Warm-up steps",
    "optimizer": "Optimiser",
    "scheduler": "LR schedule",
    "precision": "Precision",
    "device": "Device",
    "seed": "Seed",
    "repeats": "Repeats",
    "caption_prefix": "Caption prefix",
    "caption_suffix": "Caption suffix",
    "keep_tokens_separator": "Keep-tokens separator",
    "tag_dropout": "Tag dropout",
    "masked_loss": "Masked loss",
    "reg_data": "Reg data (folder of regularization pictures)",
    "class_prompt": "Class prompt (reg pictures without a caption)",
    "prior_loss_weight": "Prior loss weight (reg pictures)",
    # training methods (trainer.train.losses, noise, ema; trainer.lora.dropout)
    "network_dropout": "Network (neuron) dropout",
    "rank_dropout": "Rank dropout",
    "module_dropout": "Module dropout",
    "lr_cycles": "LR cycles (cosine with restarts)",
    "loraplus_ratio": "LoRA+ ratio (B lr / A lr)",
    "ema_decay": "EMA decay",
    "ema_export_raw": "Also write the raw (non-EMA) weights",
    "loss": "Loss",
    "huber_schedule": "Huber schedule",
    "huber_c": "Huber c",
    "huber_scale": "Huber scale",
    "debiased_estimation": "Debiased estimation",
    "scale_v_pred_loss_like_noise_pred": "Scale v-pred loss like noise-pred",
    "v_pred_like_loss": "V-pred-like loss",
    "timestep_sampling": "Timestep sampling",
    "min_timestep": "Min timestep",
    "max_timestep": "Max timestep",
    "logit_mean": "Logit-normal mean",
    "logit_std": "Logit-normal std",
    "multires_noise_iterations": "Multires noise levels",
    "multires_noise_discount": "Multires noise discount",
    "ip_noise_gamma": "Input perturbation noise (gamma)",
    # adapter types (trainer.lora.adapters)
    "network": "Network type",
    "conv_rank": "Conv rank (LoCon 3x3)",
    "conv_alpha": "Conv alpha (LoCon 3x3)",
}


@dataclass(frozen=True)
class SettingsForm:
    """The components of the form, by config field name."""

    components: dict[str, gr.components.Component]

    def overrides(self, values: dict[gr.components.Component, Any]) -> dict[str, Any]:
        """Flat config overrides from gradio dict inputs.

        An empty number box (the browser also empties it for letters typed into it) is an error
        naming the box: leaving the setting out would silently train with the preset's value.
        """
        by_component = {component: name for name, component in self.components.items()}
        flat: dict[str, Any] = {}
        table = None
        empty: list[str] = []
        for component, value in values.items():
            name = by_component.get(component)
            if name == BLOCK_TABLE:  # one table for block_dims, block_alphas and block_lr
                table = value
            elif name is not None:
                converted = widget_to_value(name, value)
                if converted is not None:
                    flat[name] = converted
                elif isinstance(component, gr.Number):
                    empty.append(name)
        if empty:
            boxes = ", ".join(f'"{label_of(name)}"' for name in empty)
            raise ConfigError(f"{boxes} {'needs a number' if len(empty) == 1 else 'need numbers'}.",
                              hint="Type a number (digits, e.g. 12 or 1e-4); letters are not kept in a number box.")
        if table is not None:  # blank cells take the network's rank and alpha
            flat.update(rows_to_fields(table, flat.get("rank"), flat.get("alpha")))
        return flat

    def updates(self, config: StudioConfig) -> dict[gr.components.Component, Any]:
        """New widget values showing ``config`` (for a preset change or a loaded run)."""
        values = config_values(config)
        values[BLOCK_TABLE] = fields_to_rows(values)
        return {component: values[name] for name, component in self.components.items()}


def label_of(name: str) -> str:
    """The on-screen label of a config field."""
    return LABELS.get(name, name.replace("_", " ").capitalize())


_FIELD_PATH = re.compile(r"\b(?:" + "|".join(SECTIONS) + r")\.(\w+)\b")


def on_screen_names(error: ConfigError) -> ConfigError:
    """``error`` with config paths (``optim.lr``) replaced by the form's labels ("Learning rate (UNet)")."""
    def label(match: re.Match) -> str:
        name = match.group(1)
        return f'"{label_of(name)}"' if name in field_index() and name not in APP_OWNED else match.group(0)

    return ConfigError(_FIELD_PATH.sub(label, error.message), hint=error.hint and _FIELD_PATH.sub(label, error.hint))


def editable_fields() -> list[str]:
    return [name for name in field_index() if name not in APP_OWNED]


def config_values(config: StudioConfig) -> dict[str, Any]:
    """Every field of ``config`` as the value its widget shows."""
    flat = {name: value for section in config_to_dict(config).values() for name, value in section.items()}
    return {name: value_to_widget(name, flat[name]) for name in editable_fields()}


def value_to_widget(name: str, value: Any) -> Any:
    if _is_text_list(name):
        return "\n".join(value or ())
    return value


def widget_to_value(name: str, value: Any) -> Any:
    """A widget's value as the config expects it; None means 'not set'."""
    if _is_text_list(name):
        return [line.strip() for line in str(value or "").splitlines() if line.strip()]
    if value is None:
        return None
    if _kind(name) is int and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def build_settings_form(config: StudioConfig) -> SettingsForm:
    """Lay out every editable field (Essentials first, then one accordion per section)."""
    values = config_values(config)
    components: dict[str, gr.components.Component] = {}
    index = field_index()
    with gr.Group(elem_id="settings-essentials"):
        with gr.Row():
            for name in ESSENTIALS[:5]:
                components[name] = _widget(name, index[name][1], values[name])
        with gr.Row():
            for name in ESSENTIALS[5:10]:
                components[name] = _widget(name, index[name][1], values[name])
        with gr.Row():
            for name in ESSENTIALS[10:]:
                components[name] = _widget(name, index[name][1], values[name])
    for section, cls in SECTIONS.items():
        names = [f.name for f in cls.__dataclass_fields__.values()
                 if f.name not in APP_OWNED and f.name not in ESSENTIALS and f.name not in BLOCK_FIELDS]
        if not names:
            continue
        with gr.Accordion(f"More settings: {SECTION_TITLES[section]}", open=False, elem_id=f"settings-{section}"):
            for start in range(0, len(names), 3):
                with gr.Row():
                    for name in names[start:start + 3]:
                        components[name] = _widget(name, index[name][1], values[name])
            if section == "network":
                components[BLOCK_TABLE] = block_table_widget(values)
    return SettingsForm(components)


# --- helpers -------------------------------------------------------------------------------------


def _type_of(name: str) -> Any:
    section, f = field_index()[name]
    return typing.get_type_hints(SECTIONS[section])[f.name]


def _kind(name: str) -> Any:
    hint = _type_of(name)
    return hint if hint in (int, float, bool, str) else typing.get_origin(hint)


def _is_text_list(name: str) -> bool:
    return typing.get_origin(_type_of(name)) is tuple


def _widget(name: str, f: Any, value: Any) -> gr.components.Component:
    label = label_of(name)
    info = f.metadata.get("help", "")
    common = dict(label=label, info=info, elem_id=f"setting-{name}", interactive=True)
    hint = _type_of(name)
    if typing.get_origin(hint) is Literal:
        return gr.Dropdown(choices=list(typing.get_args(hint)), value=value, **common)
    if hint is bool:
        return gr.Checkbox(value=bool(value), **common)
    if hint is int:
        return gr.Number(value=value, precision=0, **common)
    if hint is float:
        return gr.Number(value=value, **common)
    if _is_text_list(name):
        return gr.Textbox(value=value, lines=2, **common)
    return gr.Textbox(value=value, **common)
