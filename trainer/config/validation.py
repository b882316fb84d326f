"""Range checks that types alone cannot express: one pass over a typed ``StudioConfig``.

``schema.config_from_dict`` calls ``validate`` on every config it builds, so the engine never
sees an out-of-range value; each message names the field and the fix. Imports only ``trainer.core``
(the dataclasses are read by attribute, not imported).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from trainer.core.devices import check_device_name
from trainer.core.errors import ConfigError
from trainer.core.output_paths import is_inside, same_file

MAX_TRAINING_SEED = 2**32 - 1  # numpy's seed range; torch and Python take it as well
MIN_RESOLUTION, MAX_RESOLUTION = 64, 4096  # px: data.resolution's range (0 = the model's own)

# ``config`` below is a ``schema.StudioConfig``; it is typed ``Any`` because schema calls into this
# module, and an import back (even under TYPE_CHECKING) would be a cycle the layout test refuses.
StudioConfig = Any


def validate(config: StudioConfig) -> None:
    """Range checks that types alone cannot express. Raises ConfigError on the first problem."""
    n, o, t, d = config.network, config.optim, config.train, config.data
    _require(n.rank >= 1, "network.rank", n.rank, "Use a rank of 1 or more (4-128 is typical).")
    _require(n.rank <= 1024, "network.rank", n.rank, "Use a rank of 1024 or less.")
    _require(n.alpha > 0, "network.alpha", n.alpha, "Use a positive alpha (often rank or rank/2).")
    _require(0 <= n.lora_dropout < 1, "network.lora_dropout", n.lora_dropout, "Use a value in [0, 1).")
    _require(o.lr > 0, "optim.lr", o.lr, "Use a positive learning rate such as 1e-4.")
    _require(o.te_lr >= 0, "optim.te_lr", o.te_lr, "Use 0 (half of lr) or a positive learning rate.")
    _require(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "Use 0 or a small positive value.")
    _require(o.warmup_steps >= 0, "optim.warmup_steps", o.warmup_steps, "Use 0 or more.")
    _require(o.max_grad_norm >= 0, "optim.max_grad_norm", o.max_grad_norm, "Use 0 (off) or a positive norm.")
    _require(o.grad_accum >= 1, "optim.grad_accum", o.grad_accum, "Use 1 or more.")
    validate_methods(config)
    _require(t.steps >= 0, "train.steps", t.steps, "Use 0 (derive from epochs) or a positive number.")
    _require(t.epochs >= 1, "train.epochs", t.epochs, "Use 1 or more.")
    _require(t.batch_size >= 1, "train.batch_size", t.batch_size, "Use 1 or more.")
    _require(abs(t.seed) <= MAX_TRAINING_SEED, "train.seed", t.seed, f"Use a seed from 0 to {MAX_TRAINING_SEED}.")
    check_device_name(t.device, "train.device")
    _require(t.min_snr_gamma >= 0, "train.min_snr_gamma", t.min_snr_gamma, "Use 0 (off) or a positive gamma such as 5.")
    _require(t.noise_offset >= 0, "train.noise_offset", t.noise_offset, "Use 0 (off) or a small value such as 0.05.")
    _require(d.repeats >= 1, "data.repeats", d.repeats, "Use 1 or more.")
    _require(d.resolution == 0 or d.resolution >= MIN_RESOLUTION, "data.resolution", d.resolution,
             f"Use 0 (the model's native size) or at least {MIN_RESOLUTION} pixels.")
    _require(d.resolution <= MAX_RESOLUTION, "data.resolution", d.resolution, f"Use {MAX_RESOLUTION} pixels or less.")
    _require(d.min_bucket_side >= 64, "data.min_bucket_side", d.min_bucket_side, "Use at least 64 pixels.")
    _require(d.max_bucket_side == 0 or d.max_bucket_side >= d.min_bucket_side, "data.max_bucket_side",
             d.max_bucket_side, "Use 0 (twice the resolution) or at least data.min_bucket_side.")
    _require(0 <= d.caption_dropout < 1, "data.caption_dropout", d.caption_dropout, "Use a value in [0, 1).")
    _require(d.keep_tokens >= 0, "data.keep_tokens", d.keep_tokens, "Use 0 or more.")
    _require(0 <= d.tag_dropout < 1, "data.tag_dropout", d.tag_dropout, "Use a value in [0, 1), e.g. 0.1.")
    _require("," not in d.keep_tokens_separator and d.keep_tokens_separator == d.keep_tokens_separator.strip(),
             "data.keep_tokens_separator", d.keep_tokens_separator,
             "Use a marker without commas or outer spaces that never occurs in a tag, such as '|||' (empty = off).")
    _require(0 <= d.prior_loss_weight <= 100, "data.prior_loss_weight", d.prior_loss_weight,
             "Use a weight from 0 to 100 (1.0 = as much as a training picture).")
    _require(not d.reg_data.strip() or d.reg_data.strip().rstrip("/\\") != d.data.strip().rstrip("/\\"),
             "data.reg_data", d.reg_data, "Use a folder of class pictures other than the training folder.")
    _require(1 <= config.model.clip_skip <= 64, "model.clip_skip", config.model.clip_skip,
             "Use 1 (last layer) or 2 (A1111's 'clip skip 2'); the loaded text encoder sets the upper limit.")
    out = config.output
    _require(out.save_every >= 0, "output.save_every", out.save_every, "Use 0 (end only) or a positive number.")
    _require(out.keep_last >= 1, "output.keep_last", out.keep_last, "Keep at least 1 checkpoint.")
    _require(out.sample_every >= 0, "output.sample_every", out.sample_every, "Use 0 (off) or a positive number.")
    _require(0 <= out.sample_seed <= MAX_TRAINING_SEED, "output.sample_seed", out.sample_seed,
             f"Use a seed from 0 to {MAX_TRAINING_SEED}.")
    _require(out.sample_steps >= 1, "output.sample_steps", out.sample_steps, "Use 1 or more.")
    _require(out.output.endswith(".safetensors"), "output.output", out.output,
             "Name the output file with a .safetensors extension.")
    if config.model.base.strip() and same_file(out.output, config.model.base.strip()):
        raise ConfigError(f"output.output = {out.output!r} is the base model's file; saving the LoRA there would "
                          "replace the checkpoint.", hint="Choose another output file, e.g. output/lora.safetensors.")
    if d.data.strip() and is_inside(out.output, d.data.strip()):
        raise ConfigError(f"output.output = {out.output!r} is inside the dataset folder {d.data.strip()}; the run's "
                          "sample pictures and the file's preview would be read as training pictures next time.",
                          hint="Save the LoRA outside the dataset folder, e.g. next to it.")
    validate_epoch_outputs(config)
    _refuse_past_64_bits(config)  # last: a field's own range (seeds) names the fix better


def _refuse_past_64_bits(config: StudioConfig) -> None:
    """Whole numbers without a bound of their own (steps, repeats, ...): past 64 bits no setting
    means them, torch cannot take them, and the page cannot carry them back (its JSON is 64-bit)."""
    for section in dataclasses.fields(config):
        part = getattr(config, section.name)
        for f in dataclasses.fields(part):
            value = getattr(part, f.name)
            if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 2**63:
                raise ConfigError(f"{section.name}.{f.name} = {value} is too large.",
                                  hint="Use a whole number below 2^63 (9.2e18).")


def validate_epoch_outputs(config: StudioConfig) -> None:
    """Epoch files, validation pictures and trackers (the sampler's name is checked by the session,
    which knows the samplers)."""
    out, d = config.output, config.data
    for name in ("save_lora_every", "save_lora_every_steps", "keep_lora_last", "validate_every"):
        _require(getattr(out, name) >= 0, f"output.{name}", getattr(out, name), "Use 0 (off) or a positive number.")
    _require(0 <= d.validation_split < 1, "data.validation_split", d.validation_split,
             "Use 0 (off) or a share below 1, such as 0.1.")
    _require(not (d.validation_split and d.validation_data.strip()), "data.validation_split", d.validation_split,
             "Use either validation_split or validation_data, not both.")
    _require(out.log_with in ("", "tensorboard"), "output.log_with", out.log_with,
             "Use 'tensorboard' or leave it empty.")


def validate_methods(config: StudioConfig) -> None:
    """The training-method settings: dropouts, LoRA+, EMA, lr cycles, loss, timesteps, noise."""
    n, o, t = config.network, config.optim, config.train
    for name in ("network_dropout", "rank_dropout", "module_dropout"):
        value = getattr(n, name)
        _require(0 <= value < 1, f"network.{name}", value, "Use 0 (off) or a probability below 1 (0.1 typical).")
    validate_network_type(config)
    _require(o.lr_cycles >= 1, "optim.lr_cycles", o.lr_cycles, "Use 1 or more cycles.")
    _require(o.lr_cycles == 1 or o.scheduler == "cosine_with_restarts", "optim.lr_cycles", o.lr_cycles,
             "Cycles only apply to scheduler = \"cosine_with_restarts\": set that schedule, or lr_cycles = 1.")
    _require(o.loraplus_ratio >= 0, "optim.loraplus_ratio", o.loraplus_ratio, "Use 0 (off) or a positive ratio (16 typical).")
    _require(o.ema_decay == 0 or 0 < o.ema_decay < 1, "optim.ema_decay", o.ema_decay,
             "Use 0 (off) or a decay between 0 and 1 such as 0.999.")
    _require(not config.output.ema_export_raw or o.ema_decay > 0, "output.ema_export_raw", True,
             "The raw weights are the normal export without EMA: set optim.ema_decay (e.g. 0.999) or turn this off.")
    _require(t.huber_c > 0, "train.huber_c", t.huber_c, "Use a positive threshold such as 0.1.")
    _require(t.huber_schedule == "constant" or t.huber_c <= 1, "train.huber_c", t.huber_c,
             "The snr and exponential schedules need huber_c in (0, 1]; 0.1 is kohya's default.")
    _require(t.huber_scale > 0, "train.huber_scale", t.huber_scale, "Use a positive scale such as 1.")
    _require(t.v_pred_like_loss >= 0, "train.v_pred_like_loss", t.v_pred_like_loss, "Use 0 (off) or a positive multiple.")
    _require(not (t.v_pred_like_loss and t.zero_terminal_snr), "train.v_pred_like_loss", t.v_pred_like_loss,
             "It divides by SNR, which is 0 at the last step of a zero-terminal-SNR schedule: turn one of them off.")
    _require(0 <= t.min_timestep <= 999, "train.min_timestep", t.min_timestep, "Use a timestep in 0-999.")
    _require(1 <= t.max_timestep <= 1000, "train.max_timestep", t.max_timestep, "Use a timestep in 1-1000.")
    _require(t.min_timestep < t.max_timestep, "train.max_timestep", t.max_timestep,
             f"Use a value above train.min_timestep ({t.min_timestep}).")
    if t.timestep_sampling == "uniform":
        for name, default in (("min_timestep", 0), ("max_timestep", 1000)):
            _require(getattr(t, name) == default, f"train.{name}", getattr(t, name),
                     "uniform sampling uses the whole schedule: set timestep_sampling = \"range\" (or "
                     f"\"logit_normal\") to sample within bounds, or leave {name} at {default}.")
    _require(t.logit_std > 0, "train.logit_std", t.logit_std, "Use a positive standard deviation such as 1.")
    _require(t.multires_noise_iterations >= 0, "train.multires_noise_iterations", t.multires_noise_iterations,
             "Use 0 (off) or a number of levels such as 6.")
    _require(0 < t.multires_noise_discount <= 1, "train.multires_noise_discount", t.multires_noise_discount,
             "Use a discount in (0, 1], such as 0.3.")
    _require(t.ip_noise_gamma >= 0, "train.ip_noise_gamma", t.ip_noise_gamma, "Use 0 (off) or a small value such as 0.1.")


def check_resolution_multiple(resolution: int, factor: int) -> None:
    """Called once the model is known: its latent grid needs sides divisible by ``factor``."""
    if resolution % factor:
        lower = resolution - resolution % factor
        raise ConfigError(
            f"data.resolution = {resolution} is not a multiple of {factor}, which this model needs.",
            hint=f"Use {lower} or {lower + factor}.",
        )


def _require(ok: bool, name: str, value: Any, fix: str) -> None:
    if not ok:
        raise ConfigError(f"{name} = {value!r} is out of range.", hint=fix)


def validate_network_type(config: StudioConfig) -> None:
    """What each adapter type (lora, dora, locon, loha, lokr) can be combined with."""
    n = config.network
    lycoris = n.network in ("loha", "lokr")
    _require(not (lycoris and n.rslora), "network.rslora", True,
             f"rsLoRA scaling is a LoRA option; network = {n.network} scales by alpha/rank: turn rslora off.")
    _require(not (lycoris and (n.network_dropout or n.rank_dropout or n.module_dropout)), "network.network", n.network,
             "kohya's network/rank/module dropouts act on LoRA's lora_down, which LoHa/LoKr do not have: "
             "set them to 0, or use lora/dora/locon.")
    _require(n.network == "locon" or not (n.conv_rank or n.conv_alpha), "network.conv_rank", n.conv_rank,
             "conv_rank/conv_alpha apply to network = locon (LoRA on the 3x3 convolutions) only.")
    _require(n.conv_rank >= 0 and n.conv_alpha >= 0, "network.conv_rank", n.conv_rank, "Use 0 (the rank) or more.")
    _require(n.network in ("lora", "locon") or not config.output.export_peft, "output.export_peft", True,
             f"The diffusers/PEFT copy holds plain LoRA only; network = {n.network} exports kohya/LyCORIS keys "
             "(which every UI reads): turn export_peft off.")
    for name in ("block_dims", "block_alphas", "block_lr"):
        text = getattr(n, name).replace(" ", "")
        if not text:
            continue
        try:
            values = [float(v) for v in text.split(",")]
        except ValueError:
            values = []
        _require(len(values) in (23, 25) and all(v >= 0 for v in values), f"network.{name}", getattr(n, name),
                 "Give one number of 0 or more per UNet block, comma-separated: 25 for SD1/SD2, 23 for SDXL.")
    _require(not n.block_alphas or n.block_dims, "network.block_alphas", n.block_alphas,
             "block_alphas go with block_dims (one rank per block): set block_dims too.")
