"""The size of the LoRA file a run will write, worked out before it runs, header included.

The tensors' bytes follow from the shapes alone (``trainer.lora.sizing.lora_size``); the header
holds the run's metadata, whose length depends on the run: its tag frequencies, dataset folders,
buckets, optimiser, names. ``planned_file_size`` builds that metadata the way the export will
(``trainer.train.export.export_info``) from what is known before training (the dataset scan, the
buckets, the config), so the plan names the file's size to within the few bytes that only the
run itself fixes (its start time's digits, a checkpointing choice made for memory).
"""

from __future__ import annotations

import math
import time
from types import SimpleNamespace

import torch

from trainer.config.schema import StudioConfig
from trainer.data.regularization import scan_regularization
from trainer.data.scan import DatasetScan
from trainer.data.training_set import TrainingSet
from trainer.lora.inject import plan_lora
from trainer.lora.metadata import build_metadata
from trainer.lora.sizing import Architecture, lora_size
from trainer.train.export import export_info
from trainer.train.fingerprint import run_fingerprint
from trainer.train.session import choose_precision


def planned_file_size(config: StudioConfig, arch: Architecture, scan: DatasetScan, resolution: int) -> tuple[int, int]:
    """(modules, bytes) of the file the run of ``config`` will export on ``arch``'s base."""
    training_set = TrainingSet(scan, config.data, resolution, bucket_step=_resolution_multiple(arch),
                               reg=scan_regularization(config.data))
    metadata = build_metadata(export_info(_planned_session(config, arch, scan, training_set, resolution),
                                          _total_steps(config, training_set)))
    return lora_size(config, arch, config.output.export_dtype, metadata=metadata)


def _planned_session(config: StudioConfig, arch: Architecture, scan: DatasetScan, training_set: TrainingSet,
                     resolution: int) -> SimpleNamespace:
    """What ``export_info`` reads of a training session, as far as it is known before one exists."""
    wanted = config.train.device
    device = torch.device("cpu" if wanted == "cpu" or (wanted == "auto" and not torch.cuda.is_available())
                          else ("cuda" if wanted == "auto" else wanted))
    from trainer.train.optim import adamw, build_optimizer

    probe = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": config.optim.lr}]
    try:
        optimizer = build_optimizer(config, probe, device, lambda _: None)
    except (ImportError, RuntimeError):
        optimizer = adamw(probe, lr=config.optim.lr, weight_decay=config.optim.weight_decay)
    prediction = config.model.prediction_type
    return SimpleNamespace(
        config=config, training_set=training_set, scan=scan, resolution=resolution,
        accelerator=SimpleNamespace(num_processes=1, mixed_precision=choose_precision(config, device)),
        plan=plan_lora(config.network, arch.unet, arch.text_encoders),
        model=SimpleNamespace(family=arch.family,
                              prediction_type=prediction if prediction != "auto" else "epsilon"),
        started_at=time.time(), fingerprint=run_fingerprint(config, training_set, None),  # a hash: the same length whatever the base
        batches_per_epoch=training_set.steps_per_epoch(config.train.batch_size),
        total_steps=_total_steps(config, training_set), grad_checkpointing=config.train.grad_checkpointing,
        optimizer=optimizer, latent_cache=object() if config.train.cache_latents else None, ema=None)


def _total_steps(config: StudioConfig, training_set: TrainingSet) -> int:
    batches = training_set.steps_per_epoch(config.train.batch_size)
    return config.train.steps or config.train.epochs * math.ceil(batches / config.optim.grad_accum)


def _resolution_multiple(arch: Architecture) -> int:
    # as trainer.models.loading.BaseModel.resolution_multiple: VAE factor 8 x 2^(levels - 1), at least 64
    levels = len(arch.unet.config.down_block_types)
    return max(8 * 2 ** (levels - 1), 64)
