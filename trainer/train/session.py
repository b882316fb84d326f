"""Everything a training run holds, set up once: model, data, LoRA, optimiser, caches, RNG.

``open_session`` turns a validated config into a ready ``Session``; the loop in
``trainer.train.loop`` then only calls its small methods. Resume state (what a checkpoint saves and
restores) is gathered here too, so the loop never touches RNGs or optimiser internals.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs

from trainer.config.schema import StudioConfig
from trainer.config.validation import check_resolution_multiple
from trainer.core.devices import check_training_precision, resolve_device
from trainer.core.errors import CheckpointError, ConfigError
from trainer.data.caches import LatentCache, TextEmbeddingCache, encode_latents
from trainer.data.holdout import split_validation
from trainer.data.lint import LintReport, lint_dataset
from trainer.data.masks import latent_mask
from trainer.data.regularization import scan_regularization
from trainer.data.scan import DatasetScan, scan_dataset
from trainer.data.training_set import SampleRef, TrainingSet
from trainer.lora import inject as lora_inject
from trainer.lora.dropout import attach_kohya_dropout
from trainer.models.identity import base_weights_hash
from trainer.models.loading import BaseModel, load_base_model
from trainer.models.text import (
    check_clip_skip,
    count_tokens,
    encode_text,
    encode_text_sdxl,
    tokenize,
)
from trainer.train.ema import LoraEma
from trainer.train.estimate import Estimator, checkpointing_for_memory
from trainer.train.fingerprint import legacy_fingerprint, run_fingerprint
from trainer.train.loss_weighting import check_prediction_type_options
from trainer.train.optim import (
    build_lr_scheduler,
    build_optimizer,
    lora_param_groups,
    schedule_notice,
)
from trainer.train.transfers import ParkedModules, to_device

SUPPORTED_FAMILIES = ("sd1", "sd2", "sdxl")
COMPILE_BACKEND = "inductor"  # torch.compile's default; tests use "aot_eager", which compiles in seconds
Notify = Callable[[str, str], None]  # (level, text)
BASE_HASH_CACHE = "base-weights-hashes.json"  # in the run folder: a resume does not hash the base again


def run_dir_for(output: str | Path) -> Path:
    """Where a run keeps checkpoints, samples, caches and logs: ``out/name.safetensors`` -> ``out/name_run``."""
    output = Path(output)
    return output.parent / f"{output.stem}_run"


def choose_precision(config: StudioConfig, device: torch.device) -> str:
    """accelerate's mixed_precision: fp16/bf16 only where they pay off (CUDA), fp32 elsewhere."""
    precision = config.train.precision
    if precision == "auto":
        if device.type != "cuda":
            return "no"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return {"fp32": "no", "fp16": "fp16", "bf16": "bf16"}[precision]


def _accelerator(config: StudioConfig) -> Accelerator:
    probe = resolve_device(config.train.device, "train.device")  # before any model loads: here, and able to
    check_training_precision(config.train.precision, probe, "train.precision")  # run this precision
    if probe.index is not None and "LOCAL_RANK" not in os.environ:
        torch.cuda.set_device(probe)  # a single process trains on the current CUDA device: make it cuda:N
    return Accelerator(
        cpu=probe.type == "cpu",
        mixed_precision=choose_precision(config, probe),
        gradient_accumulation_steps=1,  # accumulation is done by the loop (it knows the step count)
        # With several processes the others wait while the main one fills the latent cache or makes
        # samples; NCCL's 10-minute default would abort a big dataset's first encoding pass.
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(hours=1))],
    )


@dataclass
class Session:
    config: StudioConfig
    accelerator: Accelerator
    model: BaseModel
    scan: DatasetScan
    training_set: TrainingSet
    lint: LintReport
    plan: lora_inject.LoraPlan
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    latent_cache: LatentCache | None
    text_cache: TextEmbeddingCache | None
    run_dir: Path
    resolution: int
    total_steps: int
    batches_per_epoch: int
    fingerprint: str
    noise_generator: torch.Generator
    idle_encoders: ParkedModules  # the VAE / frozen text encoders whose outputs are all cached
    grad_checkpointing: bool  # asked for, or turned on because the run would not fit without it
    base_hash: str | None = None  # content hash of the base model's weights (None for a hub id)
    legacy_fingerprint: str | None = None  # what a checkpoint of the earlier scheme holds for this run
    validation_scan: DatasetScan | None = None  # held-out pictures (data.validation_split / validation_data)
    ema: LoraEma | None = None  # the average of the LoRA weights that samples and export use (optim.ema_decay)
    batch_cursor: int = 0  # batches consumed by this process so far (drives data order on resume)
    loss_ema: float | None = None
    started_at: float = field(default_factory=time.time)
    _epoch_cache: dict[int, list] = field(default_factory=dict)

    # --- data ------------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def next_batch(self) -> tuple[int, list]:
        """(epoch, refs) of the next batch of this process, in a fixed seeded order."""
        procs, rank = self.accelerator.num_processes, self.accelerator.process_index
        position = self.batch_cursor * procs + rank
        epoch, index = divmod(position, self.batches_per_epoch)
        if epoch not in self._epoch_cache:
            self._epoch_cache = {epoch: self.training_set.epoch_batches(epoch, self.config.train.batch_size, self.config.train.seed)}
        self.batch_cursor += 1
        return epoch, self._epoch_cache[epoch][index]

    def epoch_at(self, step: int) -> int:
        """Whole epochs done after ``step`` optimiser steps (all processes' batches count)."""
        batches = step * self.config.optim.grad_accum * self.accelerator.num_processes
        return batches // max(self.batches_per_epoch, 1)

    def latents_for(self, refs: list) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(latents [B,C,h,w], SDXL ``add_time_ids`` [B,6] or None for SD1/SD2)."""
        if self.latent_cache is not None:
            entries = [self._cache_entry(ref) for ref in refs]
            latents = torch.stack([entry.latents for entry in entries])
            geometry = [(entry.crop_top_left, entry.original_size) for entry in entries]
        else:
            loaded = [self.training_set.load_pixels(ref) for ref in refs]  # a batch shares one bucket
            with torch.no_grad():
                latents = encode_latents(self.model.vae, torch.stack([pixels for pixels, _, _ in loaded]))
            geometry = [(crop_top_left, original_size) for _, crop_top_left, original_size in loaded]
        latents = to_device(latents, self.device)
        if self.model.family != "sdxl":
            return latents, None
        # SDXL's micro-conditioning: original (h, w), crop top-left (y, x), target (h, w) = the bucket
        time_ids = [[*original_size, *crop_top_left, ref.bucket[1], ref.bucket[0]]
                    for ref, (crop_top_left, original_size) in zip(refs, geometry)]
        return latents, to_device(torch.tensor(time_ids, dtype=torch.float32), self.device)

    def _cache_entry(self, ref: SampleRef):
        item = self.training_set.items[ref.index]
        mask_key = item.mask.key if item.mask is not None and self.config.data.masked_loss else ""
        return self.latent_cache.get(item.sha256, ref.bucket, ref.flip, lambda: self.training_set.load_pixels(ref),
                                     mask_key, lambda: self.training_set.load_mask(ref))

    def masks_for(self, refs: list, latent_hw: tuple[int, int]) -> torch.Tensor | None:
        """[B, 1, h, w] loss masks of a batch on the device; None when masked loss is off or no
        picture of the batch has a mask (every weight would be 1)."""
        if not self.config.data.masked_loss:
            return None
        masks: list[torch.Tensor | None] = []
        for ref in refs:
            if self.training_set.items[ref.index].mask is None:
                masks.append(None)
            elif self.latent_cache is not None:
                masks.append(self._cache_entry(ref).mask)  # in memory since latents_for
            else:
                pixels = self.training_set.load_mask(ref)
                masks.append(None if pixels is None else latent_mask(pixels, latent_hw))
        if all(mask is None for mask in masks):
            return None
        ones = torch.ones(1, *latent_hw)
        return torch.stack([(ones if mask is None else mask).to(self.device) for mask in masks])

    def text_embeddings_for(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hidden states the UNet cross-attends to, SDXL pooled embedding or None)."""
        if self.text_cache is not None:
            cached = self.text_cache.get_batch(captions)
            hidden, pooled = cached if isinstance(cached, tuple) else (cached, None)
        else:
            hidden, pooled = encode_captions(self.model, captions, self.config.model.clip_skip)
        return to_device(hidden, self.device), None if pooled is None else to_device(pooled, self.device)

    def warm_caches(self, notify: Notify) -> None:
        """Encode every (image, bucket, flip) the run will see, and every static caption, up front;
        then keep the caches on the device and park the encoders they replace."""
        if self.latent_cache is not None:
            flips = (False, True) if self.config.data.flip else (False,)
            for index, bucket in enumerate(self.training_set.item_buckets):
                for flip in flips:
                    self.latents_for([SampleRef(index, bucket, flip, slot=0)])
            notify("info", f"Latents ready for {len(self.training_set.items) * len(flips)} image variants "
                           f"({self.latent_cache.encoded} newly encoded).")
            self.latent_cache.to(self.device)
        if self.text_cache is not None:
            self.text_cache.get_batch(sorted({item.caption for item in self.training_set.items}))
            self.text_cache.to(self.device)
        self.idle_encoders.park()
        if self.idle_encoders.parked:
            notify("info", "The models whose outputs are cached wait in host memory until samples are made.")

    # --- resume ----------------------------------------------------------------------------------

    def resume_state(self) -> dict[str, Any]:
        """Everything needed to continue exactly where the run is now."""
        components = {name: self.accelerator.unwrap_model(m) for name, m in self.trainable_models().items()}
        return {
            "fingerprint": self.fingerprint,
            "base_hash": self.base_hash,
            "total_steps": self.total_steps,
            "lora": {name: {k: v for k, v in lora_inject.lora_state(m).items()} for name, m in components.items()},
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "batch_cursor": self.batch_cursor,
            "loss_ema": self.loss_ema,
            "noise_generator": self.noise_generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "python_rng": random.getstate(),
            "numpy_rng": np.random.get_state(),
            "num_processes": self.accelerator.num_processes,
            # Each process draws its own noise (and LoRA dropout): keep every process's stream, not just the main's.
            "process_noise_generators": self._gather_rng_state(self.noise_generator.get_state()),
            "process_torch_rngs": self._gather_rng_state(torch.get_rng_state()),
            # LoRA dropout masks on a GPU come from its own default generator
            "process_cuda_rngs": (self._gather_rng_state(torch.cuda.get_rng_state(self.device))
                                  if self.device.type == "cuda" else None),
            "ema": self.ema.state_dict() if self.ema is not None else None,
        }

    def _gather_rng_state(self, state: torch.Tensor) -> torch.Tensor:
        """[num_processes, n] RNG states of all processes (a collective: every process must call it)."""
        if self.accelerator.num_processes == 1:
            return state.unsqueeze(0)
        return self.accelerator.gather(state.to(self.device).unsqueeze(0)).cpu()

    def restore(self, state: dict[str, Any], source: Path) -> None:
        saved = state.get("fingerprint")
        if saved != self.fingerprint and not (self.legacy_fingerprint and saved == self.legacy_fingerprint):
            if state.get("base_hash") not in (None, self.base_hash):
                raise CheckpointError(
                    f"The checkpoint {source} was made on other base model weights than those now at "
                    f"{self.config.model.base} (the file or folder was replaced or changed).",
                    hint="Resume with the original model, or start a new run with another output name.")
            raise CheckpointError(
                f"The checkpoint {source} was made with a different config or dataset.",
                hint="Resume with the same settings and images, or start a new run with another --output.",
            )
        for name, model in self.trainable_models().items():
            lora_inject.load_lora_state(self.accelerator.unwrap_model(model), state["lora"][name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        saved_processes, processes = int(state.get("num_processes", 1)), self.accelerator.num_processes
        # batch_cursor counts each process's batches: convert when resuming with another process count
        self.batch_cursor = math.ceil(int(state["batch_cursor"]) * saved_processes / processes)
        self.loss_ema = state["loss_ema"]
        rank = self.accelerator.process_index
        if "process_noise_generators" in state and rank < len(state["process_noise_generators"]):
            self.noise_generator.set_state(state["process_noise_generators"][rank].clone())
            torch.set_rng_state(state["process_torch_rngs"][rank].clone())
        elif rank == 0:
            self.noise_generator.set_state(state["noise_generator"])
            torch.set_rng_state(state["torch_rng"])
        else:  # a process the checkpoint did not have: a fresh stream of its own
            self.noise_generator.manual_seed(self.config.train.seed + rank + 7919 * self.batch_cursor)
        cuda_rngs = state.get("process_cuda_rngs")
        if self.device.type == "cuda" and cuda_rngs is not None and rank < len(cuda_rngs):
            torch.cuda.set_rng_state(cuda_rngs[rank].clone(), self.device)
        random.setstate(state["python_rng"])
        np.random.set_state(state["numpy_rng"])
        if self.ema is not None:
            self.ema.load_state_dict(state.get("ema") or {})

    def trainable_models(self) -> dict[str, torch.nn.Module]:
        models = {"unet": self.model.unet}
        for name in ("text_encoder", "text_encoder_2"):
            if name in self.plan.modules:
                models[name] = getattr(self.model, name)
        return models


def encode_captions(model: BaseModel, captions: list[str], clip_skip: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(hidden states, pooled embedding or None) of ``captions`` with the model's text encoder(s)."""
    ids = tokenize(model.tokenizer, captions)
    if model.family == "sdxl":
        ids_2 = tokenize(model.tokenizer_2, captions)
        return encode_text_sdxl(model.text_encoder, model.text_encoder_2, ids, ids_2, clip_skip)
    return encode_text(model.text_encoder, ids, clip_skip), None


def use_zero_terminal_snr(model: BaseModel) -> None:
    """Rescale the training schedule to zero terminal SNR; samples then use trailing timesteps.

    At t = T the noisy latent is pure noise, so an epsilon model would learn nothing there (and
    min-SNR weighting divides by SNR = 0): the option is for v-prediction models only.
    """
    from diffusers import DDPMScheduler

    if model.prediction_type != "v_prediction":
        raise ConfigError(
            f"train.zero_terminal_snr needs a v-prediction model, but {model.name} predicts {model.prediction_type}.",
            hint="Turn zero_terminal_snr off, or set model.prediction_type = \"v_prediction\" if the model is a v-prediction one.")
    model.scheduler_config = {**model.scheduler_config, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
    model.noise_scheduler = DDPMScheduler.from_config(model.scheduler_config, prediction_type=model.prediction_type)


def open_session(config: StudioConfig, notify: Notify) -> Session:
    """Load, check and wire everything for ``config``; raises StudioError subclasses on bad input."""
    accelerator = _accelerator(config)
    torch.manual_seed(config.train.seed)
    random.seed(config.train.seed)
    np.random.seed(config.train.seed % 2**32)

    model = load_base_model(config.model, dtype=torch.float32, supported=SUPPORTED_FAMILIES)
    check_clip_skip(model.name, model.text_encoders(), config.model.clip_skip, "model.clip_skip")
    if config.train.zero_terminal_snr:
        use_zero_terminal_snr(model)
    check_prediction_type_options(config.train, model.prediction_type, model.name)
    resolution = config.data.resolution or model.native_resolution
    check_resolution_multiple(resolution, model.resolution_multiple)

    scan, validation_scan = split_validation(scan_dataset(config.data), config.data, config.train.seed)
    reg_scan = scan_regularization(config.data)
    training_set = TrainingSet(scan, config.data, resolution, bucket_step=model.resolution_multiple, reg=reg_scan)
    batches_per_epoch = training_set.steps_per_epoch(config.train.batch_size)
    per_step = config.optim.grad_accum * accelerator.num_processes
    total_steps = config.train.steps or config.train.epochs * math.ceil(batches_per_epoch / per_step)
    lint = lint_dataset(scan, config.data, resolution, lambda c: count_tokens(model.tokenizer, c),
                        epochs=config.train.epochs, batch_size=config.train.batch_size, steps=config.train.steps,
                        bucket_step=model.resolution_multiple, reg_scan=reg_scan)
    for issue in lint.issues:
        if issue.severity != "info":
            notify("warning", f"{issue.path.name if issue.path else 'dataset'}: {issue.message}")

    # Frozen weights in the compute dtype; LoRA weights are created in fp32 afterwards.
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    for module, dtype in ((model.unet, weight_dtype), *((te, weight_dtype) for te in model.text_encoders()),
                          (model.vae, torch.float32)):  # fp16 VAEs overflow; it runs once per image
        if module.device != accelerator.device or module.dtype != dtype:
            module.to(accelerator.device, dtype=dtype)

    encoders = {"text_encoder": model.text_encoder}
    if model.text_encoder_2 is not None:
        encoders["text_encoder_2"] = model.text_encoder_2
    plan = lora_inject.plan_lora(config.network, model.unet, encoders)
    trained_encoders = [name for name in encoders if name in plan.modules]
    trained = {"unet": model.unet, **{name: encoders[name] for name in trained_encoders}}
    for name, module in trained.items():
        lora_inject.inject_lora(module, plan.modules[name], config.network, plan.ranks.get(name))
        attach_kohya_dropout(module, config.network)
    param_groups = lora_param_groups(trained, config)
    checkpointing = use_checkpointing(config, model, accelerator.device, resolution, notify)
    if checkpointing:
        model.unet.enable_gradient_checkpointing()
        for name in trained_encoders:
            _enable_text_encoder_checkpointing(encoders[name])

    if accelerator.device.type == "cuda":
        model.unet.to(memory_format=torch.channels_last)  # cuDNN's fp16/bf16 convolutions run fastest in NHWC
    if config.train.compile:
        model.unet.compile(backend=COMPILE_BACKEND)  # in place: module names and state_dict keys stay as they are
    for trainable in (model.unet, *encoders.values()):
        trainable.train()  # LoRA dropout is active in train mode; the frozen layers have none
    optimizer = build_optimizer(config, param_groups, accelerator.device, lambda text: notify("warning", text))
    lr_scheduler = build_lr_scheduler(config, optimizer, total_steps)
    if notice := schedule_notice(config):
        notify("warning", notice)
    prepared = accelerator.prepare(model.unet, *(encoders[name] for name in trained_encoders), optimizer)
    model.unet = prepared[0]
    for name, wrapped in zip(trained_encoders, prepared[1:-1]):
        setattr(model, name, wrapped)
    optimizer = prepared[-1]
    ema = None
    if config.optim.ema_decay:
        ema = LoraEma([p for group in optimizer.param_groups for p in group["params"]], config.optim.ema_decay)

    run_dir = run_dir_for(config.output.output)
    hash_cache = run_dir / BASE_HASH_CACHE if accelerator.is_main_process else None  # only the main process writes
    base_hash = base_weights_hash(config.model.base, hash_cache)
    latent_cache = LatentCache(model.vae, run_dir / "cache") if config.train.cache_latents else None
    text_cache = None
    if config.train.cache_text and not trained_encoders and training_set.is_caption_static:
        def encode(captions: list[str]):
            hidden, pooled = encode_captions(model, captions, config.model.clip_skip)
            return hidden if pooled is None else (hidden, pooled)

        text_cache = TextEmbeddingCache(encode)
    noise_generator = torch.Generator().manual_seed(config.train.seed + accelerator.process_index)
    idle = [model.vae] if latent_cache else []
    if text_cache:
        idle += [encoder for name, encoder in encoders.items() if name not in trained_encoders]
    return Session(
        config=config, accelerator=accelerator, model=model, scan=scan, training_set=training_set, lint=lint, plan=plan,
        optimizer=optimizer, lr_scheduler=lr_scheduler, latent_cache=latent_cache, text_cache=text_cache,
        run_dir=run_dir, resolution=resolution, total_steps=total_steps, batches_per_epoch=batches_per_epoch,
        fingerprint=run_fingerprint(config, training_set, base_hash), base_hash=base_hash,
        legacy_fingerprint=legacy_fingerprint(config, training_set), noise_generator=noise_generator,
        idle_encoders=ParkedModules(idle, accelerator.device), grad_checkpointing=checkpointing, ema=ema,
        validation_scan=validation_scan,
    )


def use_checkpointing(config: StudioConfig, model: BaseModel, device: torch.device, resolution: int,
                      notify: Notify) -> bool:
    """Gradient checkpointing when asked for, or on a GPU when the run would not fit without it."""
    if config.train.grad_checkpointing or device.type != "cuda":
        return config.train.grad_checkpointing
    # The estimate counts the weights, which are on the GPU already: what this process holds is its too.
    free_bytes = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_allocated(device)
    plan = checkpointing_for_memory(Estimator(model), config, free_bytes, device=device, resolution=resolution)
    if plan.notice:
        notify(plan.level, plan.notice)
    return plan.checkpointing


def _enable_text_encoder_checkpointing(encoder: torch.nn.Module) -> None:
    """transformers >= 5 renamed gradient checkpointing to activation checkpointing."""
    if hasattr(encoder, "activation_checkpointing_enable"):
        encoder.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
