"""How much memory and time a training run will take, predicted before anything is loaded.

Method. The model's *shapes* come from a forward pass on PyTorch's ``meta`` device: the real
diffusers/transformers modules built from the model's configs, run on tensors that have shapes
but no storage, at the run's resolution, in about a second and with no weights in memory (an
``Estimator`` keeps these counts per resolution and target set, so changing rank, batch,
precision, device or caching re-estimates instantly). Hooks on that pass count, per component:

- FLOPs of every Linear and Conv2d (2·in·out per output element) and of attention
  (4·queries·keys·inner_dim: QKᵀ and PV);
- an activation-size proxy: the elements of every leaf module's output (what autograd keeps for
  the backward pass scales with it);
- the inputs of the layers LoRA goes on (``trainer.lora.inject``'s target sets): LoRA's A matrix needs
  them for its weight gradient, so they stay alive until the backward pass; shared inputs
  (q/k/v read the same tensor) count once in fp32, once per layer under autocast (each layer
  casts its own copy).

Memory = frozen weights in their dtype (UNet, text encoder(s); VAE in fp32, as
``trainer.train.session`` keeps it; on a GPU without the VAE / frozen text encoders whose outputs are
cached, which wait in host memory during the steps) + LoRA parameters, gradients and optimiser
state in fp32 + activations (``ACTIVATION_BYTES_PER_ELEMENT`` × proxy × 4 bytes in fp32, 3 under
fp16/bf16 autocast, plus the LoRA inputs) + on CPU ``CPU_TRANSIENT_SHARE`` of the UNet's weight
bytes (oneDNN's reordered weight copies and scratch: 280 MB for SD 1.5); when latents are not
cached the VAE encoder's no-grad peak counts instead if larger (it runs before the UNet, one
batch at a time), and gradient checkpointing keeps ~30% of the activations. Batch scales the
activations linearly. On a GPU the caching phase (all weights on the GPU, the VAE encoding one
image) is a peak of its own and counts when it is the larger. It predicts what ``bench.train_step`` measures:
``torch.cuda.max_memory_allocated`` on a GPU (the CUDA context, ~0.3–0.5 GB, comes on top: see
``runtime_overhead_bytes``), and resident tensors plus transient growth on a CPU.

Time = FLOPs / the device's effective rate, with spatial (3×3) convolutions (the VAE's, at image
resolution, faster on a CPU than the UNet's) and everything else (Linear, 1×1, attention) at separate rates, + weight traffic (each forward or backward pass reads
every frozen weight; at batch 1 and low resolution on a CPU that, not arithmetic, dominates:
~0.9 s of a 1.6 s SD 1.5 step at 128 px) + a dispatch/launch cost per module call. A step is forward +
activation-gradient backward of the UNet (2× the forward FLOPs, attention 3× because the fused
kernels recompute), LoRA's own matmuls (3× their forward FLOPs: forward, input gradient, weight
gradients, at a quarter of the Linear rate: rank-r matmuls are skinny and memory-bound; 3 extra
module calls per LoRA layer), the text encoder when it is trained (same rule)
or not cached (forward only), the VAE encoder when latents are not cached, and one extra UNet
forward with gradient checkpointing. Caching costs one VAE encoder forward per image and bucket
(and one text-encoder forward per caption).

Calibration. ``CPU_*_FLOPS_PER_THREAD``, ``CPU_WEIGHT_BYTES_PER_SECOND``, ``CPU_TRANSIENT_SHARE``
and ``ACTIVATION_BYTES_PER_ELEMENT`` were fitted to ``python -m bench.train_step`` on the real SD 1.5
architecture (random weights), fp32, on a 2-core x86 CPU at 128 and 256 px (quiet-machine runs;
memory within 7%, step time within ~10% there). Larger CPU steps run more efficiently than this
fit assumes (it overestimates a 512 px CPU step by up to ~2×). GPU rates are a share
(``GPU_EFFICIENCY``) of each card's dense fp16/bf16 tensor rate plus a per-call launch cost, and
``HALF_PRECISION_ACTIVATION_BYTES`` is reasoned, not measured: treat GPU times as ±50% and GPU
memory as ±25% until ``python -m bench.train_step --device cuda`` (which prints the error and the
implied FLOP rate) calibrates them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import torch

from trainer.config.schema import StudioConfig
from trainer.train.step_profile import (
    ComponentProfile,
    ModelArch,
    StepProfile,
    model_arch,
    profile_step,
)

# --- calibrated constants (see the module docstring) -----------------------------------------
ACTIVATION_BYTES_PER_ELEMENT = 1.0  # autograd-saved bytes per proxy element, per byte of dtype
HALF_PRECISION_ACTIVATION_BYTES = 3.0  # fp16/bf16 autocast: norms and softmax statistics stay fp32
LORA_SAVED_FRACTION = 1.0  # share of LoRA-layer inputs autograd keeps beyond the frozen model's own
CPU_CONV_FLOPS_PER_THREAD = 95e9  # effective fp32 FLOP/s of one thread on 3x3 convolutions (oneDNN)
CPU_OTHER_FLOPS_PER_THREAD = 57e9  # ... on Linear/1x1/attention at SD sizes
# The VAE's 3x3 convolutions at image resolution (large spatial extent, 128-512 channels) run nearer
# the CPU's peak than the UNet's on small latents: fitted to the bench's caching time (20 images at
# 128 px in 8.2 s) and its uncached step (VAE + text encoder ~0.4 s over the cached one).
CPU_IMAGE_CONV_FLOPS_PER_THREAD = 150e9
SECONDS_PER_MODULE_CALL = {"cpu": 20e-6, "cuda": 40e-6}  # per module forward or backward (a few kernels)
CPU_WEIGHT_BYTES_PER_SECOND = 7.7e9  # frozen weights read (and reordered by oneDNN) per pass
GPU_WEIGHT_BYTES_PER_SECOND = 1.0e12  # HBM/GDDR share a pass achieves
LORA_RATE_SHARE = 0.25  # rank-r matmuls are skinny, memory-bound: a quarter of the Linear rate (fitted)
LORA_CALLS_PER_LAYER = 3  # lora_A, lora_B, dropout: the module calls a peft layer adds
CPU_TRANSIENT_SHARE = 0.085  # of the UNet's weight bytes: oneDNN weight reorders and scratch, allocator slack
CHECKPOINTED_ACTIVATION_SHARE = 0.3  # block outputs kept, the rest recomputed in the backward
VAE_NO_GRAD_FRACTION = 0.1  # share of the VAE encoder's outputs alive at once without autograd
CUDA_ALLOCATOR_OVERHEAD = 1.10  # caching-allocator rounding and fragmentation on top of live tensors
CPU_RUNTIME_BYTES = 600 * 1024**2  # Python, torch and diffusers themselves (not in the bench's peak)
CUDA_CONTEXT_BYTES = 450 * 1024**2  # CUDA context and kernels: outside max_memory_allocated

# Dense fp16/bf16 tensor-core FLOP/s by GPU name fragment; fp32 runs at FP32_SHARE of it.
GPU_PEAK_FLOPS = {
    "H200": 989e12, "H100": 989e12, "A100": 312e12, "L40": 181e12, "A6000": 155e12, "4090": 165e12,
    "4080": 97e12, "4070": 58e12, "4060": 30e12, "3090": 71e12, "3080": 60e12, "3070": 40e12,
    "3060": 25e12, "A10": 125e12, "L4": 121e12, "T4": 65e12, "V100": 125e12, "2080": 40e12,
}
GPU_EFFICIENCY = 0.12  # achieved share of peak on a batch-1 diffusion step (small kernels, norms)
FP32_SHARE = 0.25  # fp32 (TF32 off) against the fp16 tensor rate
DEFAULT_GPU_PEAK = 40e12

OPTIMIZER_STATE_BYTES = {"adamw": 8, "adamw8bit": 2, "prodigy": 16, "adafactor": 4}  # per LoRA parameter
DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


# --- the estimate ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Estimate:
    """Predicted cost of a run. ``peak_memory_bytes`` is comparable to
    ``torch.cuda.max_memory_allocated`` (GPU) or resident tensors + transients (CPU); add
    ``runtime_overhead_bytes`` for what the process needs in total."""

    peak_memory_bytes: int
    step_seconds: float
    total_seconds: float  # caching + all steps (0 when the number of images is unknown and steps=0)
    device: str
    caching_seconds: float = 0.0
    total_steps: int = 0
    runtime_overhead_bytes: int = 0
    breakdown: dict[str, int] = field(default_factory=dict)  # weights / lora_state / activations / vae_encode / caching_phase
    step_flops: float = 0.0
    notes: tuple[str, ...] = ()


class Estimator:
    """Estimates for one model; keeps the shape profiles it has counted, so changing the rank,
    batch, precision, device or caching settings costs no new meta forward (the GUI keeps one
    per loaded model)."""

    def __init__(self, model_or_arch: Any) -> None:
        self.arch = model_arch(model_or_arch)
        self._profiles: dict[tuple, StepProfile] = {}

    def profile(self, width: int, height: int, targets: str, train_text_encoder: bool, te_mlp: bool) -> StepProfile:
        key = (width, height, targets, train_text_encoder, te_mlp and train_text_encoder)
        if key not in self._profiles:
            self._profiles[key] = profile_step(self.arch, width, height, targets, train_text_encoder, key[-1])
        return self._profiles[key]

    def estimate(self, config: StudioConfig, *, device: str | torch.device | None = None,
                 num_images: int | None = None, resolution: int | None = None) -> Estimate:
        """See ``estimate_run``."""
        dev = _device(device if device is not None else config.train.device)
        precision = _precision(config.train.precision, dev)
        side = resolution or config.data.resolution or _native_resolution(self.arch)
        net = config.network
        profile = self.profile(side, side, net.targets, net.train_text_encoder, net.te_mlp)
        return _estimate(config, profile, dev, precision, num_images)


def estimate_run(config: StudioConfig, model_or_arch: Any, *, device: str | torch.device | None = None,
                 num_images: int | None = None, resolution: int | None = None) -> Estimate:
    """Predict peak memory and time of training ``config`` on ``model_or_arch``.

    ``model_or_arch``: a loaded ``BaseModel``, a ``ModelArch``, a bundled name (``sd15``, ``sd2``,
    ``sdxl``) or a diffusers folder (only its configs are read). ``device`` defaults to
    ``config.train.device`` (``auto``: CUDA when present). ``num_images`` (images × repeats)
    turns epochs into steps when ``config.train.steps`` is 0. ``resolution`` overrides
    ``config.data.resolution`` (0 there means the model's native size).
    """
    return Estimator(model_or_arch).estimate(config, device=device, num_images=num_images, resolution=resolution)


def _estimate(config: StudioConfig, profile: StepProfile, dev: torch.device, precision: str,
              num_images: int | None) -> Estimate:
    dtype_bytes = DTYPE_BYTES[precision]
    batch, rank = config.train.batch_size, config.network.rank
    unet, encoders, vae = profile.unet, profile.text_encoders, profile.vae_encoder
    te_trained = config.network.train_text_encoder
    text_cached = config.train.cache_text and not te_trained and not config.data.shuffle_captions \
        and config.data.caption_dropout == 0
    latents_cached = config.train.cache_latents
    trained = [unet] + (list(encoders) if te_trained else [])

    # Memory: weights + LoRA state + activations (or the no-grad VAE encode, if larger). On a GPU
    # the VAE and frozen text encoders whose outputs are cached wait in host memory during the
    # steps (trainer.train.transfers.ParkedModules): the caching phase before the first step, with every
    # model on the GPU and the VAE encoding, is then a peak of its own.
    te_bytes = sum(te.params for te in encoders) * dtype_bytes
    vae_bytes = profile.vae_params * 4
    all_weights = unet.params * dtype_bytes + te_bytes + vae_bytes
    parks = dev.type != "cpu"
    weights = all_weights - (vae_bytes if parks and latents_cached else 0) - (te_bytes if parks and text_cached else 0)
    lora_params = rank * sum(part.lora_params_per_rank for part in trained)
    state_per_param = 4 + 4 + OPTIMIZER_STATE_BYTES.get(config.optim.optimizer, 8)  # weight, grad, state
    state_per_param += 4 if config.optim.ema_decay else 0  # the fp32 EMA copy
    lora_state = lora_params * state_per_param
    vae_encode = batch * VAE_NO_GRAD_FRACTION * vae.activation_elements * 4  # no grad, one batch at a time
    activations = 0.0
    activation_bytes = dtype_bytes if precision == "fp32" else HALF_PRECISION_ACTIVATION_BYTES
    for part in trained:
        inputs = part.lora_input_elements_shared if precision == "fp32" else part.lora_input_elements_per_layer
        saved = (LORA_SAVED_FRACTION * inputs + part.lora_tokens * rank) * dtype_bytes
        activations += batch * (ACTIVATION_BYTES_PER_ELEMENT * part.activation_elements * activation_bytes + saved)
    if config.train.grad_checkpointing:
        activations *= CHECKPOINTED_ACTIVATION_SHARE
    vae_peak = 0 if latents_cached else vae_encode
    peak = weights + lora_state + max(activations, vae_peak)
    caching_peak = all_weights + lora_params * 4 + vae_encode / batch if latents_cached and parks else 0
    peak = max(peak, caching_peak)
    if dev.type == "cuda":
        peak *= CUDA_ALLOCATOR_OVERHEAD
    else:
        peak += CPU_TRANSIENT_SHARE * unet.params * dtype_bytes

    # Time: FLOPs at their rates (spatial convolutions and the rest apart) + weight traffic (every
    # pass reads every frozen weight: at batch 1 and low resolution that, not arithmetic, is the
    # floor on a CPU) + a dispatch/launch cost per module call.
    speed = _speed(dev, precision)
    conv_flops = image_conv_flops = other_flops = lora_flops = weight_traffic = 0.0
    calls = 0

    def add(part: ComponentProfile, passes: int, weight_bytes: int, lora: bool = False, image: bool = False) -> None:
        nonlocal conv_flops, image_conv_flops, other_flops, lora_flops, weight_traffic, calls
        if image:
            image_conv_flops += batch * passes * part.conv_flops
        else:
            conv_flops += batch * passes * part.conv_flops
        other_flops += batch * (passes * (part.flops - part.conv_flops) + (passes - 1) * part.attention_flops)
        weight_traffic += passes * part.params * weight_bytes
        calls += passes * part.module_calls
        if lora:  # forward, input gradient and weight gradients of both LoRA matrices
            lora_flops += batch * 3.0 * rank * part.lora_flops_per_rank
            calls += 2 * LORA_CALLS_PER_LAYER * part.lora_layers

    for part in trained:  # forward + activation-gradient backward (+ LoRA)
        add(part, 2, dtype_bytes, lora=True)
    if not te_trained and not text_cached:
        for te in encoders:
            add(te, 1, dtype_bytes)
    if not latents_cached:
        add(vae, 1, 4, image=True)
    if config.train.grad_checkpointing:
        add(unet, 1, dtype_bytes)
    step_seconds = speed.seconds(conv_flops, other_flops + lora_flops / LORA_RATE_SHARE, weight_traffic, calls,
                                 image_conv_flops)
    flops = conv_flops + image_conv_flops + other_flops + lora_flops

    total_steps = config.train.steps
    if not total_steps and num_images:
        total_steps = config.train.epochs * math.ceil(num_images * config.data.repeats / batch / config.optim.grad_accum)
    caching_seconds = 0.0
    if num_images and latents_cached:
        caching_seconds += num_images * speed.forward_seconds(vae, 4, image=True)
    if num_images and text_cached:
        caching_seconds += num_images * sum(speed.forward_seconds(te, dtype_bytes) for te in encoders)
    total_seconds = caching_seconds + total_steps * config.optim.grad_accum * step_seconds
    return Estimate(
        peak_memory_bytes=int(peak), step_seconds=step_seconds, total_seconds=total_seconds,
        device=_device_label(dev), caching_seconds=caching_seconds, total_steps=total_steps,
        runtime_overhead_bytes=CUDA_CONTEXT_BYTES if dev.type == "cuda" else CPU_RUNTIME_BYTES, step_flops=flops,
        breakdown={"weights": int(weights), "lora_state": int(lora_state), "activations": int(activations),
                   "vae_encode": int(vae_peak), "caching_phase": int(caching_peak)},
        notes=("GPU step times are not calibrated yet (±50%); memory is.",) if dev.type == "cuda" else (),
    )


MEMORY_HEADROOM = 0.9  # plan for this share of the GPU's free memory: the rest is fragmentation and other programs


class MemoryPlan(NamedTuple):
    checkpointing: bool
    notice: str = ""  # for the user; empty when there is nothing to say
    level: str = "info"  # "warning" when the run may not fit even so


def checkpointing_for_memory(estimator: Estimator, config: StudioConfig, free_bytes: int, *,
                             device: str | torch.device = "cuda", resolution: int | None = None) -> MemoryPlan:
    """Whether to use gradient checkpointing on a GPU with ``free_bytes`` free.

    Checkpointing costs about a third more time per step, so it is used when it was asked for, or
    when the run would not fit otherwise; when even then it would not fit, the notice says what to lower.
    """
    if config.train.grad_checkpointing:
        return MemoryPlan(True)
    budget = MEMORY_HEADROOM * free_bytes
    plain = estimator.estimate(config, device=device, resolution=resolution)
    if plain.peak_memory_bytes <= budget:
        return MemoryPlan(False)
    checkpointed = estimator.estimate(replace(config, train=replace(config.train, grad_checkpointing=True)),
                                      device=device, resolution=resolution)
    need, free = _gib(plain.peak_memory_bytes), _gib(free_bytes)
    if checkpointed.peak_memory_bytes <= budget:
        return MemoryPlan(True, f"Gradient checkpointing turned on: this run needs about {need} without it and the "
                                f"GPU has {free} free; steps take about a third longer.")
    return MemoryPlan(True, f"This run may not fit: it needs about {_gib(checkpointed.peak_memory_bytes)} even with "
                            f"gradient checkpointing (turned on) and the GPU has {free} free. Lower the resolution, "
                            "the batch size or the rank, or close other programs using the GPU.", "warning")


def _gib(size: float) -> str:
    return f"{size / 1024**3:.1f} GB"


def _native_resolution(arch: ModelArch) -> int:
    scale = 2 ** (len(arch.vae_config["block_out_channels"]) - 1)
    return int(arch.unet_config.get("sample_size", 64)) * scale


def _device(wanted: str | torch.device) -> torch.device:
    if isinstance(wanted, torch.device):
        return wanted
    if wanted == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(wanted)


def _precision(precision: str, device: torch.device) -> str:
    """Same rule as ``trainer.train.session.choose_precision``: half precision only on CUDA by default."""
    if precision != "auto":
        return precision
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp16"


@dataclass(frozen=True)
class _Speed:
    conv_flops_per_second: float
    image_conv_flops_per_second: float  # the VAE's convolutions at image resolution
    other_flops_per_second: float
    weight_bytes_per_second: float
    seconds_per_call: float

    def seconds(self, conv_flops: float, other_flops: float, weight_traffic: float, calls: int,
                image_conv_flops: float = 0.0) -> float:
        return (conv_flops / self.conv_flops_per_second + image_conv_flops / self.image_conv_flops_per_second
                + other_flops / self.other_flops_per_second
                + weight_traffic / self.weight_bytes_per_second + calls * self.seconds_per_call)

    def forward_seconds(self, part: ComponentProfile, weight_bytes: int, image: bool = False) -> float:
        """One no-grad forward of ``part`` at batch 1 (``image``: its convolutions run at image resolution)."""
        convs = (0.0, part.conv_flops) if image else (part.conv_flops, 0.0)
        return self.seconds(convs[0], part.flops - part.conv_flops, part.params * weight_bytes, part.module_calls,
                            convs[1])


def _speed(device: torch.device, precision: str) -> _Speed:
    """How fast ``device`` runs each kind of work at ``precision``."""
    if device.type == "cuda":
        peak = DEFAULT_GPU_PEAK
        if torch.cuda.is_available():
            name = torch.cuda.get_device_name(device)
            peak = next((v for k, v in GPU_PEAK_FLOPS.items() if k in name), DEFAULT_GPU_PEAK)
        rate = peak * GPU_EFFICIENCY * (FP32_SHARE if precision == "fp32" else 1.0)
        return _Speed(rate, rate, rate, GPU_WEIGHT_BYTES_PER_SECOND, SECONDS_PER_MODULE_CALL["cuda"])
    threads = torch.get_num_threads()
    half = 0.5 if precision != "fp32" else 1.0  # no fast half-precision kernels on most CPUs
    return _Speed(CPU_CONV_FLOPS_PER_THREAD * threads * half, CPU_IMAGE_CONV_FLOPS_PER_THREAD * threads * half,
                  CPU_OTHER_FLOPS_PER_THREAD * threads * half,
                  CPU_WEIGHT_BYTES_PER_SECOND, SECONDS_PER_MODULE_CALL["cpu"])


def _device_label(device: torch.device) -> str:
    if device.type == "cuda" and torch.cuda.is_available():
        return f"cuda ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        return f"cpu ({torch.get_num_threads()} threads)"
    return str(device)
