"""The header metadata of an exported LoRA: kohya's ``ss_*`` keys and the SAI ``modelspec.*`` keys.

A1111, Forge and Civitai read these (base-model version, trigger phrase, dataset tags, training
settings); every value is a string, as safetensors requires.
"""

from __future__ import annotations

import datetime
import json
import math
from dataclasses import dataclass, field

from trainer.lora.reading import (  # noqa: F401  (re-exported: the reading half of the formats API)
    LoraFile,
    LoraModule,
    check_lora_fits,
    detect_lora_family,
    read_lora_file,
)

_BASE_MODEL_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}


@dataclass(frozen=True)
class TrainingMethods:
    """The loss, noise, timestep, dropout, LoRA+ and EMA settings a file records (kohya's keys)."""

    loss_type: str = "l2"
    huber_schedule: str = "snr"
    huber_c: float = 0.1
    huber_scale: float = 1.0
    debiased_estimation: bool = False
    scale_v_pred_loss_like_noise_pred: bool = False
    v_pred_like_loss: float = 0.0
    min_snr_gamma: float = 0.0
    noise_offset: float = 0.0
    multires_noise_iterations: int = 0
    multires_noise_discount: float = 0.3
    ip_noise_gamma: float = 0.0
    timestep_sampling: str = "uniform"
    min_timestep: int = 0
    max_timestep: int = 1000
    network_dropout: float = 0.0
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    loraplus_ratio: float = 0.0
    lr_scheduler: str = "constant"
    lr_cycles: int = 1
    ema_decay: float = 0.0  # 0: the file holds the last step's weights

    def keys(self) -> dict[str, str]:
        """``ss_*`` keys as sd-scripts' train_network.py writes them (``None`` for an option left off);
        ss_timestep_sampling, ss_min/max_timestep, ss_lr_scheduler_num_cycles and ss_ema_decay are LoRA Studio's own."""
        def off(value: float) -> str:
            return str(value) if value else "None"

        return {
            "ss_loss_type": self.loss_type,
            "ss_huber_schedule": self.huber_schedule,
            "ss_huber_c": str(self.huber_c),
            "ss_huber_scale": str(self.huber_scale),
            "ss_debiased_estimation": str(self.debiased_estimation),
            "ss_scale_v_pred_loss_like_noise_pred": str(self.scale_v_pred_loss_like_noise_pred),
            "ss_v_pred_like_loss": off(self.v_pred_like_loss),
            "ss_min_snr_gamma": off(self.min_snr_gamma),
            "ss_noise_offset": off(self.noise_offset),
            "ss_multires_noise_iterations": off(self.multires_noise_iterations),
            "ss_multires_noise_discount": str(self.multires_noise_discount),
            "ss_ip_noise_gamma": off(self.ip_noise_gamma),
            "ss_timestep_sampling": self.timestep_sampling,
            "ss_min_timestep": str(self.min_timestep),
            "ss_max_timestep": str(self.max_timestep),
            "ss_network_dropout": off(self.network_dropout),
            "ss_lr_scheduler": self.lr_scheduler,
            "ss_lr_scheduler_num_cycles": str(self.lr_cycles),
            "ss_ema_decay": off(self.ema_decay),
        }

    def network_args(self) -> dict[str, str]:
        """kohya passes these as network_args, so they land in ``ss_network_args``."""
        args = {"rank_dropout": self.rank_dropout, "module_dropout": self.module_dropout,
                "loraplus_lr_ratio": self.loraplus_ratio}
        return {name: str(value) for name, value in args.items() if value}


@dataclass(frozen=True)
class ExportInfo:
    """What the header says about a training run (all kohya ``ss_*`` and ``modelspec.*`` keys)."""

    family: str  # "sd1" | "sd2" | "sdxl"
    output_name: str
    rank: int
    alpha: float  # the network alpha as trained (before the rsLoRA sqrt(r) factor)
    rslora: bool = False
    targets: str = "cross-attn"
    train_text_encoder: bool = True
    te_mlp: bool = False
    v_parameterization: bool = False
    resolution: tuple[int, int] = (512, 512)
    num_train_images: int = 0
    tag_frequency: dict[str, dict[str, int]] = field(default_factory=dict)  # folder -> tag -> count
    dataset_dirs: dict[str, dict[str, int]] = field(default_factory=dict)  # folder -> n_repeats, img_count
    bucket_info: dict | None = None
    learning_rate: float = 1e-4
    te_learning_rate: float = 5e-5
    steps: int = 0
    epoch: int = 0
    seed: int = 0
    started_at: float = 0.0  # unix seconds
    finished_at: float = 0.0
    base_model_name: str = ""
    clip_skip: int = 1
    trigger_phrase: str = ""
    num_reg_images: int = 0  # regularization pictures x their repeats (kohya: before balancing)
    data_prep: dict[str, str] = field(default_factory=dict)  # ss_* keys of captions, masks, reg pictures
    methods: TrainingMethods = field(default_factory=TrainingMethods)

    @property
    def exported_alpha(self) -> float:
        return self.alpha * math.sqrt(self.rank) if self.rslora else self.alpha


def build_metadata(info: ExportInfo) -> dict[str, str]:
    """The header metadata of a kohya export; every value is a string (safetensors requires it)."""
    if info.family not in _BASE_MODEL_VERSION:
        raise ValueError(f"unknown model family {info.family!r}")
    width, height = info.resolution
    network_args = {"targets": info.targets, "train_text_encoder": str(info.train_text_encoder),
                    "te_mlp": str(info.te_mlp), "rslora": str(info.rslora), "train_alpha": str(info.alpha),
                    **info.methods.network_args()}
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(info.rank),
        "ss_network_alpha": str(info.exported_alpha),
        "ss_network_args": json.dumps(network_args),
        "ss_base_model_version": _BASE_MODEL_VERSION[info.family],
        "ss_v2": str(info.family == "sd2"),
        "ss_output_name": info.output_name,
        "ss_resolution": f"({width}, {height})",
        "ss_num_train_images": str(info.num_train_images),
        "ss_num_reg_images": str(info.num_reg_images),
        "ss_tag_frequency": json.dumps(info.tag_frequency),
        "ss_dataset_dirs": json.dumps(info.dataset_dirs),
        "ss_bucket_info": json.dumps(info.bucket_info),
        "ss_learning_rate": str(info.learning_rate),
        "ss_unet_lr": str(info.learning_rate),
        "ss_text_encoder_lr": str(info.te_learning_rate if info.train_text_encoder else 0.0),
        "ss_steps": str(info.steps),
        "ss_epoch": str(info.epoch),
        "ss_seed": str(info.seed),
        "ss_training_started_at": str(info.started_at),
        "ss_training_finished_at": str(info.finished_at),
        "ss_sd_model_name": info.base_model_name,
        "ss_clip_skip": str(info.clip_skip),
        "ss_training_comment": "trained with LoRA Studio",
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": _architecture(info) + "/lora",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models"
        if info.family == "sdxl" else "diffusers",
        "modelspec.title": info.output_name,
        "modelspec.resolution": f"{width}x{height}",
        "modelspec.prediction_type": "v" if info.v_parameterization else "epsilon",
        "modelspec.date": _iso_date(info.finished_at or info.started_at),
        "modelspec.trigger_phrase": info.trigger_phrase,
        "modelspec.encoder_layer": str(info.clip_skip),
        **info.methods.keys(),
    }
    meta.update(info.data_prep)
    return meta


def _architecture(info: ExportInfo) -> str:
    if info.family == "sd1":
        return "stable-diffusion-v1"
    if info.family == "sd2":
        return "stable-diffusion-v2-768-v" if info.v_parameterization else "stable-diffusion-v2-512"
    return "stable-diffusion-xl-v1-base"


def _iso_date(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp, tz=datetime.timezone.utc).isoformat(timespec="seconds")
