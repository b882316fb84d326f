"""The end of a run: the trained LoRA as a kohya/A1111-format file (plus optional PEFT copy).

With an EMA of the weights (``optim.ema_decay``) the file holds the average; ``output.ema_export_raw``
adds the last step's weights as ``NAME.raw.safetensors``.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from trainer.lora import writing
from trainer.lora.metadata import ExportInfo, TrainingMethods, build_metadata
from trainer.train.data_metadata import data_prep_metadata
from trainer.train.ema import averaged


def export_lora(session, step: int) -> tuple[Path, list[Path]]:
    """Write ``output.output`` (and, when asked, a PEFT-format copy); returns (path, extra paths)."""
    cfg = session.config
    family = session.model.family
    with averaged(session.ema):
        modules = collect_modules(session)
    trains_te = "text_encoder" in session.plan.modules
    info = ExportInfo(
        family=family,
        output_name=Path(cfg.output.output).stem,
        rank=cfg.network.rank,
        alpha=cfg.network.alpha,
        rslora=cfg.network.rslora,
        targets=cfg.network.targets,
        train_text_encoder=trains_te,
        te_mlp=cfg.network.te_mlp and trains_te,
        v_parameterization=session.model.prediction_type == "v_prediction",
        resolution=(session.resolution, session.resolution),
        num_train_images=session.training_set.num_train_items,
        tag_frequency=session.scan.tag_frequency(),
        dataset_dirs=session.scan.folder_summary(),
        bucket_info={"buckets": {f"{w}x{h}": n for (w, h), n in session.training_set.bucket_counts().items()}},
        learning_rate=cfg.optim.lr,
        te_learning_rate=cfg.effective_te_lr if trains_te else 0.0,
        steps=step,
        epoch=session.epoch_at(step),
        seed=cfg.train.seed,
        started_at=session.started_at,
        finished_at=time.time(),
        base_model_name=session.model.name,
        clip_skip=cfg.model.clip_skip,
        trigger_phrase=cfg.data.trigger,
        num_reg_images=session.training_set.reg.num_reg_images if session.training_set.reg else 0,
        data_prep=data_prep_metadata(cfg.data, session.training_set),
        methods=training_methods(cfg),
    )
    metadata = build_metadata(info)
    output = Path(cfg.output.output)
    writing.save_kohya_lora(modules, metadata, output, dtype=cfg.output.export_dtype)
    extras: list[Path] = []
    if cfg.output.export_peft:
        peft_path = output.with_name(f"{output.stem}.peft.safetensors")
        writing.save_peft_lora(modules, peft_path, dtype=cfg.output.export_dtype, metadata=metadata)
        extras.append(peft_path)
    if session.ema is not None and cfg.output.ema_export_raw:
        raw_path = output.with_name(f"{output.stem}.raw.safetensors")
        raw_info = dataclasses.replace(info, output_name=raw_path.stem,
                                       methods=dataclasses.replace(info.methods, ema_decay=0.0))
        writing.save_kohya_lora(collect_modules(session), build_metadata(raw_info), raw_path, dtype=cfg.output.export_dtype)
        extras.append(raw_path)
    return output, extras


def collect_modules(session) -> list:
    """The kohya modules of every trained component, copied from the weights in the model now."""
    unwrap = session.accelerator.unwrap_model
    modules = []
    for component, model in session.trainable_models().items():
        modules.extend(writing.collect_lora_modules(component, unwrap(model), session.model.family))
    return modules


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
