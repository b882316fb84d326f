"""The end of a run: the trained LoRA as a kohya/A1111-format file (plus optional PEFT copy)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from trainer import formats


def export_lora(session, step: int) -> tuple[Path, list[Path]]:
    """Write ``output.output`` (and, when asked, a PEFT-format copy); returns (path, extra paths)."""
    cfg = session.config
    unwrap = session.accelerator.unwrap_model
    family = session.model.family
    modules = []
    for component, model in session.trainable_models().items():
        modules.extend(formats.collect_lora_modules(component, unwrap(model), family))
    info = formats.ExportInfo(
        family=family,
        output_name=Path(cfg.output.output).stem,
        rank=cfg.network.rank,
        alpha=cfg.network.alpha,
        rslora=cfg.network.rslora,
        resolution=session.resolution,
        num_train_images=len(session.training_set.items),
        tag_frequency=session.scan.tag_frequency(),
        dataset_dirs=session.scan.folder_summary(),
        learning_rate=cfg.optim.lr,
        text_encoder_lr=cfg.effective_te_lr if "text_encoder" in session.plan.modules else None,
        steps=step,
        epoch=session.batch_cursor // max(session.batches_per_epoch, 1),
        seed=cfg.train.seed,
        started_at=session.started_at,
        finished_at=dt.datetime.now(dt.timezone.utc).timestamp(),
        base_model_name=session.model.name,
        clip_skip=cfg.model.clip_skip,
        trigger_phrase=cfg.data.trigger,
        targets=cfg.network.targets,
        train_text_encoder="text_encoder" in session.plan.modules,
        prediction_type=session.model.prediction_type,
        num_batches_per_epoch=session.batches_per_epoch,
        batch_size=cfg.train.batch_size,
        optimizer=type(session.optimizer).__name__,
        lr_scheduler=cfg.optim.scheduler,
    )
    output = Path(cfg.output.output)
    formats.save_kohya_lora(modules, formats.build_metadata(info), output, dtype=cfg.output.export_dtype)
    extras: list[Path] = []
    if cfg.output.export_peft:
        peft_path = output.with_name(f"{output.stem}.peft.safetensors")
        formats.save_peft_lora(modules, family, peft_path, dtype=cfg.output.export_dtype)
        extras.append(peft_path)
    return output, extras
