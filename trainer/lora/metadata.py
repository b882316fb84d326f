"""The header metadata of an exported LoRA: kohya's ``ss_*`` keys and the SAI ``modelspec.*`` keys.

A1111, Forge, Civitai and kohya's own tools read these, so every ``ss_*`` value has the type and
shape sd-scripts' ``train_network.py`` gives it. kohya builds a dict of Python values and writes
``str(value)`` of each: booleans are ``"True"``/``"False"``, a missing value is ``"None"``, floats
are Python's repr (``"5e-05"``), tuples are Python tuples (``ss_resolution = "(512, 512)"``), and the
JSON-valued keys are ``json.dumps`` with its defaults (``", "`` separators, ASCII escapes). The
keys are those of a command-line run with one dataset (kohya writes ``ss_bucket_info``,
``ss_resolution`` etc. only then; a TOML dataset config moves them into ``ss_datasets``).

A1111's metadata dialog parses each value that starts with ``{`` as JSON and then indexes into
``ss_bucket_info``, ``ss_tag_frequency`` and ``ss_dataset_dirs``; a wrong shape there empties the
dialog (tests/test_metadata_shapes.py reads our header the way it does). ComfyUI refuses to show
metadata when the header is over 1 MiB, so ``trim_tag_frequency`` drops the rarest tags of a
huge dataset until the header fits.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

# kohya's model_util / sdxl_model_util version strings; "_v" marks v-parameterization.
_BASE_MODEL_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}
NETWORK_MODULE = "networks.lora"
# Settings kohya's train_network.py has no ss_* key for are written under our own prefix, so the
# ss_* namespace holds exactly kohya's keys (a future sd-scripts key cannot collide with ours).
OWN_PREFIX = "lorastudio_"

# Keys kohya always writes for features LoRA Studio does not have: their values when the feature
# is off (sd-scripts' argparse defaults). Other parts of the engine override them through
# ``ExportInfo.extra`` when they add the feature.
_KOHYA_DEFAULTS: dict[str, object] = {
    "ss_num_validation_images": 0,
    "ss_full_fp16": False,
    "ss_max_token_length": None,  # None = CLIP's 75-token window, which is what we train with
    "ss_lowram": False,
    "ss_multires_noise_iterations": None,
    "ss_multires_noise_discount": 0.3,
    "ss_adaptive_noise_scale": None,
    "ss_caption_dropout_every_n_epochs": 0,
    "ss_caption_tag_dropout_rate": 0.0,
    "ss_face_crop_aug_range": None,
    "ss_prior_loss_weight": 1.0,
    "ss_scale_weight_norms": None,
    "ss_ip_noise_gamma": None,
    "ss_debiased_estimation": False,
    "ss_noise_offset_random_strength": False,
    "ss_ip_noise_gamma_random_strength": False,
    "ss_loss_type": "l2",
    "ss_huber_schedule": "snr",
    "ss_huber_scale": 1.0,
    "ss_huber_c": 0.1,
    "ss_fp8_base": False,
    "ss_fp8_base_unet": False,
    "ss_validation_seed": None,
    "ss_validation_split": 0.0,
    "ss_max_validation_steps": None,
    "ss_validate_every_n_epochs": None,
    "ss_validate_every_n_steps": None,
    "ss_resize_interpolation": None,
    "ss_color_aug": False,
    "ss_random_crop": False,
    "ss_bucket_no_upscale": False,
}


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
        """Header keys of these settings: kohya's ``ss_*`` keys as sd-scripts' train_network.py writes
        them (``None`` for an option left off), and under ``lorastudio_`` the settings kohya has no key
        for. ss_min_snr_gamma, ss_noise_offset, ss_network_dropout and ss_lr_scheduler come from
        ``ExportInfo``'s own fields."""
        def off(value: float) -> str:
            return str(value) if value else "None"

        return {
            "ss_loss_type": self.loss_type,
            "ss_huber_schedule": self.huber_schedule,
            "ss_huber_c": str(self.huber_c),
            "ss_huber_scale": str(self.huber_scale),
            "ss_debiased_estimation": str(self.debiased_estimation),
            "ss_multires_noise_iterations": off(self.multires_noise_iterations),
            "ss_multires_noise_discount": str(self.multires_noise_discount),
            "ss_ip_noise_gamma": off(self.ip_noise_gamma),
            f"{OWN_PREFIX}scale_v_pred_loss_like_noise_pred": str(self.scale_v_pred_loss_like_noise_pred),
            f"{OWN_PREFIX}v_pred_like_loss": off(self.v_pred_like_loss),
            f"{OWN_PREFIX}timestep_sampling": self.timestep_sampling,
            f"{OWN_PREFIX}min_timestep": str(self.min_timestep),
            f"{OWN_PREFIX}max_timestep": str(self.max_timestep),
            f"{OWN_PREFIX}lr_scheduler_num_cycles": str(self.lr_cycles),
            f"{OWN_PREFIX}ema_decay": off(self.ema_decay),
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
    network_args: Mapping[str, str] = field(default_factory=dict)  # the adapter type's (network_type_args)
    train_text_encoder: bool = True
    te_mlp: bool = False
    v_parameterization: bool = False
    resolution: tuple[int, int] = (512, 512)  # (width, height)
    num_train_images: int = 0  # images x repeats, as kohya counts them
    tag_frequency: dict[str, dict[str, int]] = field(default_factory=dict)  # folder -> tag -> images with it
    dataset_dirs: dict[str, dict[str, int]] = field(default_factory=dict)  # folder -> n_repeats, img_count
    bucket_info: dict | None = None  # kohya_bucket_info(...); None when bucketing is off
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
    # --- the rest of kohya's keys ---
    session_id: int = 0  # kohya: one random number per run, shared by its epoch files
    num_reg_images: int = 0  # regularisation images x their repeats
    reg_dataset_dirs: dict[str, dict[str, int]] = field(default_factory=dict)
    num_batches_per_epoch: int = 0
    num_epochs: int = 0
    max_train_steps: int = 0
    batch_size: int = 1
    total_batch_size: int = 0  # batch x processes x accumulation; 0 = batch_size x gradient_accumulation_steps
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    optimizer: str = "torch.optim.adamw.AdamW"  # kohya: "module.Class" plus "(k=v,...)" of its arguments
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"  # accelerate's names: "no", "fp16", "bf16"
    cache_latents: bool = False
    network_dropout: float | None = None
    noise_offset: float | None = None
    min_snr_gamma: float | None = None
    zero_terminal_snr: bool = False
    caption_dropout_rate: float = 0.0
    shuffle_caption: bool = False
    keep_tokens: int = 0
    flip_aug: bool = False
    min_bucket_reso: int | None = None  # None when bucketing is off, as kohya writes it
    max_bucket_reso: int | None = None
    base_model_hash: str = ""  # A1111's legacy 8-hex hash of a single-file base (kohya's ss_sd_model_hash)
    base_model_sha256: str = ""  # sha256 of that file (ss_new_sd_model_hash), when known
    training_comment: str = "trained with LoRA Studio"
    methods: TrainingMethods = field(default_factory=TrainingMethods)  # loss/noise/timestep/dropout/LoRA+/EMA keys
    data_prep: Mapping[str, str] = field(default_factory=dict)  # ss_* keys of captions, masks, reg pictures
    extra: Mapping[str, object] = field(default_factory=dict)  # more ss_* keys as Python values; kohya's str() applies

    @property
    def exported_alpha(self) -> float:
        return self.alpha * math.sqrt(self.rank) if self.rslora else self.alpha


def network_type_args(network: str, conv_rank: int = 0, conv_alpha: float = 0.0, block_dims: str = "",
                      block_alphas: str = "", block_lr: str = "") -> dict[str, str]:
    """``ss_network_module`` (as "module") and the ``ss_network_args`` of an adapter type, as kohya's
    networks.lora (LoCon's conv_dim/conv_alpha, block_dims/block_alphas) and LyCORIS's lycoris.kohya
    (algo, dora_wd) write them."""
    args: dict[str, str] = {}
    if network in ("loha", "lokr", "dora"):
        args = {"module": "lycoris.kohya", "algo": "lora" if network == "dora" else network}
        if network == "dora":
            args.update(dora_wd="True", wd_on_out="True")
    elif network == "locon":
        args = {"conv_dim": str(conv_rank), "conv_alpha": str(conv_alpha)}
    for key, value in (("block_dims", block_dims), ("block_alphas", block_alphas), ("block_lr", block_lr)):
        if value.strip():
            args[key] = value.replace(" ", "")
    return args


def kohya_value(value: object) -> str:
    """One metadata value the way kohya stores it: ``str()`` of the Python value, JSON for dicts/lists."""
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def base_model_version(family: str, v_parameterization: bool = False) -> str:
    """kohya's ``ss_base_model_version``: sd_v1, sd_v1_v, sd_v2, sd_v2_v or sdxl_base_v1-0."""
    if family not in _BASE_MODEL_VERSION:
        raise ValueError(f"unknown model family {family!r}")
    version = _BASE_MODEL_VERSION[family]
    return version + "_v" if v_parameterization and family != "sdxl" else version


def build_metadata(info: ExportInfo) -> dict[str, str]:
    """The header metadata of a kohya export; every value is a string (safetensors requires it)."""
    width, height = info.resolution
    buckets_on = info.bucket_info is not None
    _check_bucket_info(info.bucket_info)
    values: dict[str, object] = {
        "ss_session_id": info.session_id,
        "ss_training_started_at": info.started_at,
        "ss_output_name": info.output_name,
        "ss_learning_rate": info.learning_rate,
        "ss_text_encoder_lr": info.te_learning_rate if info.train_text_encoder else None,
        "ss_unet_lr": info.learning_rate,
        "ss_num_train_images": info.num_train_images,
        "ss_num_reg_images": info.num_reg_images,
        "ss_num_batches_per_epoch": info.num_batches_per_epoch,
        "ss_num_epochs": info.num_epochs,
        "ss_gradient_checkpointing": info.gradient_checkpointing,
        "ss_gradient_accumulation_steps": info.gradient_accumulation_steps,
        "ss_max_train_steps": info.max_train_steps or info.steps,
        "ss_lr_warmup_steps": info.lr_warmup_steps,
        "ss_lr_scheduler": info.lr_scheduler,
        "ss_network_module": info.network_args.get("module", NETWORK_MODULE),
        "ss_network_dim": info.rank,
        "ss_network_alpha": float(info.exported_alpha),
        "ss_network_dropout": info.network_dropout,
        "ss_mixed_precision": info.mixed_precision,
        "ss_v2": info.family == "sd2",
        "ss_base_model_version": base_model_version(info.family, info.v_parameterization),
        "ss_clip_skip": info.clip_skip,
        "ss_cache_latents": info.cache_latents,
        "ss_seed": info.seed,
        "ss_noise_offset": info.noise_offset,
        "ss_zero_terminal_snr": info.zero_terminal_snr,
        "ss_training_comment": info.training_comment or None,
        "ss_optimizer": info.optimizer,
        "ss_max_grad_norm": float(info.max_grad_norm),
        "ss_caption_dropout_rate": float(info.caption_dropout_rate),
        "ss_min_snr_gamma": info.min_snr_gamma,
        **_KOHYA_DEFAULTS,
        # a command-line run with one dataset
        "ss_batch_size_per_device": info.batch_size,
        "ss_total_batch_size": info.total_batch_size or info.batch_size * info.gradient_accumulation_steps,
        "ss_resolution": (int(width), int(height)),
        "ss_flip_aug": info.flip_aug,
        "ss_shuffle_caption": info.shuffle_caption,
        "ss_enable_bucket": buckets_on,
        "ss_min_bucket_reso": info.min_bucket_reso if buckets_on else None,
        "ss_max_bucket_reso": info.max_bucket_reso if buckets_on else None,
        "ss_keep_tokens": info.keep_tokens,
        "ss_dataset_dirs": _dataset_dirs(info.dataset_dirs),
        "ss_reg_dataset_dirs": _dataset_dirs(info.reg_dataset_dirs),
        "ss_tag_frequency": kohya_tag_frequency(info.tag_frequency),
        "ss_bucket_info": info.bucket_info,
        # kohya writes network args only when given; ours say how the layers were chosen (values are strings there)
        "ss_network_args": {"targets": info.targets, "train_text_encoder": str(info.train_text_encoder),
                            "te_mlp": str(info.te_mlp), "rslora": str(info.rslora), "train_alpha": str(info.alpha),
                            **info.methods.network_args(),
                            **{k: v for k, v in info.network_args.items() if k != "module"}},
        "ss_epoch": info.epoch,
        "ss_steps": info.steps,
        "ss_training_finished_at": info.finished_at,
        "ss_sd_model_name": info.base_model_name,
    }
    if info.base_model_hash:
        values["ss_sd_model_hash"] = info.base_model_hash
    if info.base_model_sha256:
        values["ss_new_sd_model_hash"] = info.base_model_sha256
    values.update(info.methods.keys())
    values.update(info.data_prep)
    values.update(info.extra)
    meta = {key: kohya_value(value) for key, value in values.items()}
    # json.dumps(None) is "null": kohya's ss_bucket_info when bucketing is off
    meta["ss_bucket_info"] = json.dumps(info.bucket_info)
    meta.update(_modelspec(info, width, height))
    return meta


def kohya_bucket_info(buckets: Sequence[tuple[int, int]], item_buckets: Sequence[tuple[int, int]],
                      repeats: Sequence[int], sizes: Sequence[tuple[int, int]]) -> dict:
    """kohya's ``bucket_info``: buckets that hold images, keyed by their index in ``buckets``.

    ``{"buckets": {"3": {"resolution": [w, h], "count": n}}, "mean_img_ar_error": e}``: the count
    includes repeats; the error is the mean |bucket w/h - image w/h| over images (without repeats).
    """
    index = {tuple(bucket): i for i, bucket in enumerate(buckets)}
    counts: dict[int, int] = {}
    errors = []
    for bucket, n, (width, height) in zip(item_buckets, repeats, sizes, strict=True):
        counts[index[tuple(bucket)]] = counts.get(index[tuple(bucket)], 0) + int(n)
        errors.append(abs(bucket[0] / bucket[1] - width / height))
    return {"buckets": {str(i): {"resolution": [int(buckets[i][0]), int(buckets[i][1])], "count": counts[i]}
                        for i in sorted(counts)},
            "mean_img_ar_error": float(sum(errors) / len(errors)) if errors else 0.0}


def kohya_tag_frequency(frequency: Mapping[str, Mapping[str, int]]) -> dict[str, dict[str, int]]:
    """Per folder, images per tag, with tags stripped and lower-cased as kohya counts them."""
    out: dict[str, dict[str, int]] = {}
    for folder, tags in frequency.items():
        merged = out.setdefault(str(folder), {})
        for tag, count in tags.items():
            tag = str(tag).strip().lower()
            if tag:
                merged[tag] = merged.get(tag, 0) + int(count)
    return out


def trim_tag_frequency(metadata: dict[str, str], excess_bytes: int) -> dict[str, str]:
    """``metadata`` with the rarest tags left out of ``ss_tag_frequency`` until the file's header is
    ``excess_bytes`` shorter. A1111 shows the most frequent tags first, so those are what a huge
    dataset keeps."""
    if excess_bytes <= 0 or "ss_tag_frequency" not in metadata:
        return metadata
    folders = json.loads(metadata["ss_tag_frequency"])
    listed = [(folder, tag, count) for folder, tags in folders.items() for tag, count in tags.items()]
    # rarest first; among equal counts the later-listed tag goes first
    order = sorted(range(len(listed)), key=lambda i: (listed[i][2], -i))
    dropped: set[tuple[str, str]] = set()
    saved = 0
    for i in order:
        if saved >= excess_bytes:
            break
        folder, tag, count = listed[i]
        dropped.add((folder, tag))
        # '"tag": n, ' as the header holds it: the JSON text is itself a JSON string there, escaped once more
        saved += len(json.dumps(json.dumps(tag))) - 2 + len(str(count)) + 4
    kept = {folder: {tag: n for tag, n in tags.items() if (folder, tag) not in dropped}
            for folder, tags in folders.items()}
    return {**metadata, "ss_tag_frequency": json.dumps(kept)}


def legacy_model_hash(path: str | Path) -> str:
    """A1111's old 8-hex model hash (kohya's ``ss_sd_model_hash``): sha256 of 64 KiB at offset 1 MiB."""
    with open(path, "rb") as fh:
        fh.seek(0x100000)
        return hashlib.sha256(fh.read(0x10000)).hexdigest()[:8]


# --- helpers -------------------------------------------------------------------------------------


def _dataset_dirs(dirs: Mapping[str, Mapping[str, int]]) -> dict[str, dict[str, int]]:
    return {str(folder): {"n_repeats": int(entry["n_repeats"]), "img_count": int(entry["img_count"])}
            for folder, entry in dirs.items()}


def _check_bucket_info(info: dict | None) -> None:
    # A1111 reads bucket["resolution"][0], [1] and int(bucket["count"]) for every bucket.
    if info is None:
        return
    buckets = info.get("buckets") if isinstance(info, dict) else None
    ok = isinstance(buckets, dict) and isinstance(info.get("mean_img_ar_error"), (int, float)) and all(
        isinstance(key, str) and isinstance(b, dict) and isinstance(b.get("count"), int)
        and isinstance(b.get("resolution"), list) and len(b["resolution"]) == 2 for key, b in buckets.items())
    if not ok:
        raise ValueError(f"bucket_info must have kohya's shape (see kohya_bucket_info), got {info!r}")


def _modelspec(info: ExportInfo, width: int, height: int) -> dict[str, str]:
    return {
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
    }


def _architecture(info: ExportInfo) -> str:
    if info.family == "sd1":
        return "stable-diffusion-v1"
    if info.family == "sd2":
        return "stable-diffusion-v2-768-v" if info.v_parameterization else "stable-diffusion-v2-512"
    return "stable-diffusion-xl-v1-base"


def _iso_date(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp, tz=datetime.timezone.utc).isoformat(timespec="seconds")
