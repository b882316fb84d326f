"""What a checkpoint's weights depend on, so that resuming on anything else is refused.

``run_fingerprint`` hashes the training settings, the dataset's content and the base model's
weights (``trainer.models.identity``). Settings equal to their dataclass default are left out, so
a config field added later (with a default that keeps the old behaviour) leaves every existing
fingerprint as it was. Checkpoints written before this scheme (no base hash, every field hashed)
carry ``legacy_fingerprint``; it is computed over the fields that existed then, and only for a
config that leaves every later field at its default, so those checkpoints keep resuming.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from trainer.config.schema import SECTIONS, StudioConfig, config_to_dict
from trainer.data.training_set import TrainingSet

# How a step is computed does not change the weights, and the run's length only changes the
# learning-rate schedule from here on: a run can be resumed on another device, or a finished one
# extended with more steps or epochs. The output section names files, not weights.
VOLATILE_TRAIN = ("device", "cache_latents", "cache_text", "grad_checkpointing", "compile", "steps", "epochs")

# The config fields when fingerprints still hashed every field (before the base hash): frozen.
LEGACY_FIELDS = {
    "model": "base base_config prediction_type clip_skip",
    "data": "data trigger default_caption repeats resolution buckets min_bucket_side max_bucket_side flip "
            "shuffle_captions keep_tokens caption_dropout caption_prefix caption_suffix keep_tokens_separator "
            "tag_dropout masked_loss reg_data class_prompt prior_loss_weight",
    "network": "rank alpha targets train_text_encoder te_mlp rslora lora_init lora_dropout network_dropout "
               "rank_dropout module_dropout",
    "optim": "optimizer lr te_lr weight_decay scheduler warmup_steps max_grad_norm grad_accum lr_cycles "
             "loraplus_ratio ema_decay",
    "train": "steps epochs batch_size precision grad_checkpointing compile seed min_snr_gamma noise_offset "
             "zero_terminal_snr cache_latents cache_text device loss huber_schedule huber_c huber_scale "
             "debiased_estimation scale_v_pred_loss_like_noise_pred v_pred_like_loss timestep_sampling "
             "min_timestep max_timestep logit_mean logit_std multires_noise_iterations multires_noise_discount "
             "ip_noise_gamma",
}


def run_fingerprint(config: StudioConfig, training_set: TrainingSet, base_hash: str | None) -> str:
    """Identity of a run's weights: non-default settings, dataset content, base model weights."""
    settings = _weight_settings(config)
    defaults = _defaults(config)
    changed = {section: {k: v for k, v in values.items() if defaults[section].get(k, _MISSING) != v}
               for section, values in settings.items()}
    return _digest({"settings": changed, "data": _data(training_set), "base": base_hash})


def legacy_fingerprint(config: StudioConfig, training_set: TrainingSet) -> str | None:
    """The fingerprint a checkpoint of the earlier scheme holds for this run; None when it cannot be one."""
    settings = _weight_settings(config)
    defaults = _defaults(config)
    legacy: dict[str, dict[str, Any]] = {}
    for section, values in settings.items():
        known = set(LEGACY_FIELDS.get(section, "").split())
        for name, value in values.items():
            if name not in known and defaults[section].get(name, _MISSING) != value:
                return None  # a setting the earlier scheme did not have: no earlier checkpoint matches
        legacy[section] = {k: v for k, v in values.items() if k in known}
    return _digest({"settings": legacy, "data": _data(training_set)})


_MISSING = object()


def _weight_settings(config: StudioConfig) -> dict[str, dict[str, Any]]:
    settings = config_to_dict(config)
    settings.pop("output")
    for volatile in VOLATILE_TRAIN:
        settings["train"].pop(volatile, None)
    return settings


def _defaults(config: StudioConfig) -> dict[str, dict[str, Any]]:
    """Each section's defaults, normalised like ``config_to_dict`` (tuples as lists)."""
    out = {}
    for section in SECTIONS:
        values = dataclasses.asdict(type(getattr(config, section))())
        out[section] = {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
    return out


def _data(training_set: TrainingSet) -> list[tuple]:
    return [(i.sha256, i.caption, i.repeats) for i in training_set.items]


def _digest(document: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(document, sort_keys=True, default=str).encode()).hexdigest()
