"""The end of a run: the trained LoRA as a kohya/A1111-format file, its A1111 sidecars and an
optional PEFT folder."""

from __future__ import annotations

import hashlib
import math
import re
import time
from pathlib import Path

from trainer.core.errors import StudioError
from trainer.core.safetensors_header import read_safetensors_header

from trainer.lora import writing
from trainer.lora.metadata import ExportInfo, build_metadata, kohya_bucket_info, legacy_model_hash
from trainer.lora.peft_folder import peft_folder_for, save_peft_folder
from trainer.lora.sidecars import sidecar_for_export, write_sidecars

_SAMPLE_OF_FIRST_PROMPT = re.compile(r"^step-(\d+)-0\.png$")  # trainer.train.sampling's file names


def export_lora(session, step: int) -> tuple[Path, list[Path]]:
    """Write ``output.output``, its sidecars and (when asked) the PEFT folder; returns (path, other paths)."""
    cfg = session.config
    unwrap = session.accelerator.unwrap_model
    family = session.model.family
    models = {component: unwrap(model) for component, model in session.trainable_models().items()}
    modules = []
    for component, model in models.items():
        modules.extend(writing.collect_lora_modules(component, model, family))
    info = export_info(session, step)
    output = Path(cfg.output.output)
    writing.save_kohya_lora(modules, build_metadata(info), output, dtype=cfg.output.export_dtype)
    _remove_old_peft_copy(output)
    extras: list[Path] = []
    if cfg.output.export_peft:
        extras.append(save_peft_folder(modules, peft_folder_for(output), models=models,
                                       dtype=cfg.output.export_dtype, rslora=cfg.network.rslora))
    if cfg.output.sidecars:
        extras += write_sidecars(output, sidecar_for_export(info), preview=last_sample(session.run_dir, step))
    return output, extras


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
        targets=cfg.network.targets,
        train_text_encoder=trains_te,
        te_mlp=cfg.network.te_mlp and trains_te,
        v_parameterization=session.model.prediction_type == "v_prediction",
        resolution=(session.resolution, session.resolution),
        num_train_images=training_set.num_samples,
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
        network_dropout=cfg.network.lora_dropout or None,
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
