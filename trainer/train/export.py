"""The end of a run: the trained LoRA as a kohya/A1111-format file, its A1111 sidecars and an
optional PEFT folder.

With an EMA of the weights (``optim.ema_decay``) the file holds the average; ``output.ema_export_raw``
adds the last step's weights as ``NAME.raw.safetensors``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
import time
from pathlib import Path

from trainer.core.errors import StudioError
from trainer.core.safetensors_header import read_safetensors_header
from trainer.lora import writing
from trainer.lora.metadata import (
    ExportInfo,
    network_type_args,
    TrainingMethods,
    build_metadata,
    kohya_bucket_info,
    legacy_model_hash,
)
from trainer.lora.peft_folder import peft_folder_for, save_peft_folder
from trainer.lora.sidecars import sidecar_for_export, write_sidecars
from trainer.train.data_metadata import data_prep_metadata
from trainer.train.ema import averaged

_SAMPLE_OF_FIRST_PROMPT = re.compile(r"^step-(\d+)-0\.png$")  # trainer.train.sampling's file names


def export_lora(session, step: int) -> tuple[Path, list[Path]]:
    """Write ``output.output``, its sidecars and (when asked) the PEFT folder; returns (path, other paths)."""
    cfg = session.config
    unwrap = session.accelerator.unwrap_model
    models = {component: unwrap(model) for component, model in session.trainable_models().items()}
    output = Path(cfg.output.output)
    info, modules = save_lora_file(session, step, output)
    _remove_old_peft_copy(output)
    extras: list[Path] = []
    if cfg.output.export_peft:
        extras.append(save_peft_folder(modules, peft_folder_for(output), models=models,
                                       dtype=cfg.output.export_dtype, rslora=cfg.network.rslora))
    if session.ema is not None and cfg.output.ema_export_raw:
        raw_path = output.with_name(f"{output.stem}.raw.safetensors")
        raw_info = dataclasses.replace(info, output_name=raw_path.stem,
                                       methods=dataclasses.replace(info.methods, ema_decay=0.0))
        writing.save_kohya_lora(collect_modules(session), build_metadata(raw_info), raw_path,
                                dtype=cfg.output.export_dtype)
        extras.append(raw_path)
    if cfg.output.sidecars:
        extras += write_sidecars(output, sidecar_for_export(info), preview=last_sample(session.run_dir, step))
    return output, extras


def save_lora_file(session, step: int, path: Path) -> tuple[ExportInfo, list]:
    """The kohya file of the weights now (the EMA's average when there is one) at ``path``, written
    atomically; the final file and the epoch files all come from here, so they share keys,
    metadata and dtype. Returns (its metadata, its modules)."""
    with averaged(session.ema):
        modules = collect_modules(session)
    info = export_info(session, step)
    writing.save_kohya_lora(modules, build_metadata(info), path, dtype=session.config.output.export_dtype)
    return info, modules


def collect_modules(session) -> list:
    """The kohya modules of every trained component, copied from the weights in the model now."""
    unwrap = session.accelerator.unwrap_model
    modules = []
    for component, model in session.trainable_models().items():
        modules.extend(writing.collect_lora_modules(component, unwrap(model), session.model.family))
    return modules


def export_info(session, step: int) -> ExportInfo:
    """Everything the header says about this run, in kohya's terms."""
    cfg = session.config
    training_set = session.training_set
    processes, accumulation = session.accelerator.num_processes, cfg.optim.grad_accum
    trains_te = "text_encoder" in session.plan.modules
    items = training_set.items
    base = Path(cfg.model.base).expanduser()
    return ExportInfo(
        family=session.model.family,
        output_name=Path(cfg.output.output).stem,
        rank=cfg.network.rank,
        alpha=cfg.network.alpha,
        rslora=cfg.network.rslora,
        network_args=network_type_args(cfg.network.network, cfg.network.conv_rank or cfg.network.rank,
                                       cfg.network.conv_alpha or cfg.network.alpha, cfg.network.block_dims,
                                       cfg.network.block_alphas, cfg.network.block_lr),
        targets=cfg.network.targets,
        train_text_encoder=trains_te,
        te_mlp=cfg.network.te_mlp and trains_te,
        v_parameterization=session.model.prediction_type == "v_prediction",
        resolution=(session.resolution, session.resolution),
        num_train_images=sum(item.repeats for item in items[:training_set.num_train_items]),  # reg pictures apart
        tag_frequency=session.scan.tag_frequency(),
        dataset_dirs=session.scan.folder_summary(),
        bucket_info=kohya_bucket_info(training_set.buckets, training_set.item_buckets,
                                      [item.repeats for item in items], [(item.width, item.height) for item in items])
        if cfg.data.buckets else None,
        learning_rate=cfg.optim.lr,
        te_learning_rate=cfg.effective_te_lr if trains_te else 0.0,
        steps=step,
        # kohya's ss_epoch: the (1-based) epoch the weights come from, a started one included
        epoch=math.ceil(step * accumulation * processes / max(session.batches_per_epoch, 1)),
        seed=cfg.train.seed,
        started_at=session.started_at,
        finished_at=time.time(),
        base_model_name=base.name if base.exists() else cfg.model.base,  # kohya: the basename, or the hub id
        clip_skip=cfg.model.clip_skip,
        trigger_phrase=cfg.data.trigger,
        # one id per run (resumes included), as kohya's epoch files share theirs
        session_id=int(hashlib.sha256(session.fingerprint.encode()).hexdigest()[:8], 16),
        num_batches_per_epoch=math.ceil(session.batches_per_epoch / processes),
        num_epochs=math.ceil(session.total_steps * accumulation * processes / max(session.batches_per_epoch, 1)),
        max_train_steps=session.total_steps,
        batch_size=cfg.train.batch_size,
        total_batch_size=cfg.train.batch_size * processes * accumulation,
        gradient_accumulation_steps=accumulation,
        gradient_checkpointing=session.grad_checkpointing,
        lr_scheduler=cfg.optim.scheduler,
        lr_warmup_steps=cfg.optim.warmup_steps,
        optimizer=optimizer_name(session.optimizer, cfg.optim.weight_decay),
        max_grad_norm=cfg.optim.max_grad_norm,
        mixed_precision=str(session.accelerator.mixed_precision),
        cache_latents=session.latent_cache is not None,
        network_dropout=cfg.network.network_dropout or None,  # kohya's neuron dropout (peft's lora_dropout is on the input)
        noise_offset=cfg.train.noise_offset or None,
        min_snr_gamma=cfg.train.min_snr_gamma or None,
        zero_terminal_snr=cfg.train.zero_terminal_snr,
        caption_dropout_rate=cfg.data.caption_dropout,
        shuffle_caption=cfg.data.shuffle_captions,
        keep_tokens=cfg.data.keep_tokens,
        flip_aug=cfg.data.flip,
        min_bucket_reso=min(min(b) for b in training_set.buckets),
        max_bucket_reso=max(max(b) for b in training_set.buckets),
        base_model_hash=legacy_model_hash(base) if base.is_file() else "",
        num_reg_images=training_set.reg.num_reg_images if training_set.reg else 0,
        data_prep=data_prep_metadata(cfg.data, training_set),
        methods=training_methods(cfg),
    )


def optimizer_name(optimizer, weight_decay: float) -> str:
    """kohya's ``ss_optimizer``: the class as ``module.Class``, then its settings in brackets."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it
    return f"{type(inner).__module__}.{type(inner).__name__}(weight_decay={weight_decay})"


def last_sample(run_dir: Path, step: int) -> Path | None:
    """The newest sample image of the first prompt made at or before ``step``; None if there is none."""
    best: tuple[int, Path] | None = None
    folder = run_dir / "samples"
    for path in folder.iterdir() if folder.is_dir() else ():
        if (match := _SAMPLE_OF_FIRST_PROMPT.match(path.name)) and int(match.group(1)) <= step:
            if best is None or int(match.group(1)) > best[0]:
                best = (int(match.group(1)), path)
    return None if best is None else best[1]


def _remove_old_peft_copy(output: Path) -> None:
    # Before the PEFT folder, --export-peft wrote name.peft.safetensors next to the LoRA, with the
    # same ss_* keys: UIs list it as a second, broken LoRA. Ours is recognisable by its adapter key.
    old = output.with_name(f"{output.stem}.peft.safetensors")
    if not old.is_file():
        return
    try:
        _, metadata = read_safetensors_header(old)
    except (OSError, StudioError):
        return
    if writing.PEFT_METADATA_KEY in metadata and "ss_network_module" in metadata:
        old.unlink(missing_ok=True)


def training_methods(cfg) -> TrainingMethods:
    """The method settings of ``cfg`` under the names the file's metadata uses."""
    t, n, o = cfg.train, cfg.network, cfg.optim
    return TrainingMethods(
        loss_type=t.loss, huber_schedule=t.huber_schedule, huber_c=t.huber_c, huber_scale=t.huber_scale,
        debiased_estimation=t.debiased_estimation, scale_v_pred_loss_like_noise_pred=t.scale_v_pred_loss_like_noise_pred,
        v_pred_like_loss=t.v_pred_like_loss, min_snr_gamma=t.min_snr_gamma, noise_offset=t.noise_offset,
        multires_noise_iterations=t.multires_noise_iterations, multires_noise_discount=t.multires_noise_discount,
        ip_noise_gamma=t.ip_noise_gamma, timestep_sampling=t.timestep_sampling, min_timestep=t.min_timestep,
        max_timestep=t.max_timestep, network_dropout=n.network_dropout, rank_dropout=n.rank_dropout,
        module_dropout=n.module_dropout, loraplus_ratio=o.loraplus_ratio, lr_scheduler=o.scheduler,
        lr_cycles=o.lr_cycles, ema_decay=o.ema_decay,
    )
