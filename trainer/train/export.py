"""The end of a run: the trained LoRA as a kohya/A1111-format file (plus optional PEFT copy)."""

from __future__ import annotations

import time
from pathlib import Path

from trainer.lora import writing
from trainer.lora.metadata import ExportInfo, build_metadata
from trainer.train.data_metadata import data_prep_metadata


def export_lora(session, step: int) -> tuple[Path, list[Path]]:
    """Write ``output.output`` (and, when asked, a PEFT-format copy); returns (path, extra paths)."""
    cfg = session.config
    unwrap = session.accelerator.unwrap_model
    family = session.model.family
    modules = []
    for component, model in session.trainable_models().items():
        modules.extend(writing.collect_lora_modules(component, unwrap(model), family))
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
    )
    metadata = build_metadata(info)
    output = Path(cfg.output.output)
    writing.save_kohya_lora(modules, metadata, output, dtype=cfg.output.export_dtype)
    extras: list[Path] = []
    if cfg.output.export_peft:
        peft_path = output.with_name(f"{output.stem}.peft.safetensors")
        writing.save_peft_lora(modules, peft_path, dtype=cfg.output.export_dtype, metadata=metadata)
        extras.append(peft_path)
    return output, extras
