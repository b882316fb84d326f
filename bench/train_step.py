"""Training-step benchmark: our loop against the floor and a peer-style loop, in one run.

    python -m bench.train_step                      # CPU default: 128 px, batch 1, fp32 (a few minutes)
    python -m bench.train_step --device cuda --resolution 512 --json out/bench.json   # the real one

Model: the real SD 1.5 architecture (UNet 860M, VAE, CLIP-L) with random weights, built from the
bundled configs and saved to a temporary diffusers folder (``--model-dir`` keeps/reuses it,
``--base`` takes a real model instead). Data: ``--images`` generated, captioned JPEGs.

Cases, timed interleaved (see ``bench.common``) so that their ratios hold on a busy machine:

- **floor**: the frozen UNet's forward plus the activation-gradient backward (the input latents
  require grad, no weight does), on the same latents, timesteps and text embeddings. No LoRA
  step can be cheaper.
- **ours**: one optimiser step of ``trainer.train.loop`` (``training_step`` + clip + AdamW + schedule,
  loss read once) on a ``Session`` that ``open_session`` built from a config: per target set,
  text encoder trained or frozen, caching on or off.
- **peer**: a step as diffusers' ``examples/text_to_image/train_text_to_image_lora.py`` takes it:
  image decoded and transformed, VAE encode, text-encoder forward every step, peft LoRA on
  ``to_q/to_k/to_v/to_out.0`` (our "attn" set), MSE, ``loss.item()`` every step.

The "attn, TE frozen, cached" row is the like-for-like comparison with the peer. The other rows
are timed against the floor in their own interleaved rounds; their ratio to the peer is derived
through the floor. Epochs (``--images`` pictures, batch ``--batch``): the first = the measured
time to fill a fresh latent/text cache + steps × best step time; later epochs = steps only (the
cache is warm); a 10-epoch run (the presets' default) = caching + 10 epochs of steps. The peer
has no cache, so all its epochs cost the same. ``--full-epoch`` also times a real first epoch.
Memory: see ``bench.common``; the estimator's prediction (``trainer.train.estimate``) and its error
are printed next to each measured row.
"""

from __future__ import annotations

import argparse
import gc
import random
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bench.common import (
    CaseResult,
    environment,
    format_table,
    gib,
    quiet_libraries,
    resolve_device,
    run_interleaved,
    tensor_bytes,
    time_once,
    write_json,
    write_pattern_images,
    write_random_sd15,
)


@dataclass(frozen=True)
class Variant:
    """One configuration of our loop."""

    key: str
    targets: str
    train_text_encoder: bool
    caching: bool

    @property
    def label(self) -> str:
        te = "TE trained" if self.train_text_encoder else "TE frozen"
        return f"ours {self.targets}, {te}, {'cached' if self.caching else 'no cache'}"


VARIANTS = {
    "attn": Variant("attn", "attn", False, True),  # like for like with the peer
    "cross-attn": Variant("cross-attn", "cross-attn", False, True),
    "full": Variant("full", "full", False, True),
    "attn+te": Variant("attn+te", "attn", True, True),
    "attn-nocache": Variant("attn-nocache", "attn", False, False),
}
MATCHED = "attn"
RUN_EPOCHS = 10  # the presets' default: the whole-run comparison amortises caching over this many epochs
PEER = "peer-style (diffusers example)"


@dataclass(frozen=True)
class BenchSettings:
    device: str
    resolution: int
    batch: int
    rank: int
    precision: str
    rounds: int
    warmup: int
    images: int
    variants: tuple[str, ...]
    full_epoch: bool
    base: str
    model_dir: str
    seed: int
    peer: bool


def parse_args(argv: list[str] | None = None) -> tuple[BenchSettings, str]:
    p = argparse.ArgumentParser(prog="python -m bench.train_step", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--resolution", type=int, default=0, help="pixels (default 128 on CPU, 512 on CUDA)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                   help="frozen-weight precision (auto: fp32 on CPU, fp16/bf16 on CUDA)")
    p.add_argument("--rounds", type=int, default=0, help="timed rounds per case (default 3 on CPU, 10 on CUDA)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--images", type=int, default=20, help="dataset size for the per-epoch numbers")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated subset of: {', '.join(VARIANTS)} ({MATCHED} always runs)")
    p.add_argument("--full-epoch", action="store_true", help="time a whole epoch of ours and the peer")
    p.add_argument("--no-peer", action="store_true", help="skip the peer-style loop")
    p.add_argument("--base", default="", help="a real SD 1.x model (diffusers folder or .safetensors) instead of random")
    p.add_argument("--model-dir", default="", help="where to write (or reuse) the random SD 1.5 folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="", help="also write the results to this JSON file")
    a = p.parse_args(argv)
    cuda = a.device.startswith("cuda")
    variants = tuple(dict.fromkeys([MATCHED] + [v.strip() for v in a.variants.split(",") if v.strip()]))
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    settings = BenchSettings(
        device=a.device, resolution=a.resolution or (512 if cuda else 128), batch=a.batch, rank=a.rank,
        precision=a.precision, rounds=a.rounds or (10 if cuda else 3), warmup=a.warmup, images=a.images,
        variants=variants, full_epoch=a.full_epoch, base=a.base, model_dir=a.model_dir, seed=a.seed,
        peer=not a.no_peer)
    return settings, a.json


# --- the three kinds of step -----------------------------------------------------------------


def compute_dtype(precision: str, device: torch.device) -> torch.dtype:
    if precision == "auto":
        precision = "fp32" if device.type != "cuda" else ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def autocast_for(device: torch.device, dtype: torch.dtype):
    return torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()


class FloorStep:
    """Frozen UNet forward + backward to the input latents only: the least work a LoRA step can do."""

    def __init__(self, unet: torch.nn.Module, latents: torch.Tensor, text: torch.Tensor, dtype: torch.dtype) -> None:
        self.unet, self.text, self.dtype = unet, text, dtype
        generator = torch.Generator().manual_seed(1)
        self.noisy = latents.detach().clone()
        self.target = torch.randn(latents.shape, generator=generator).to(latents.device, latents.dtype)
        self.timesteps = torch.randint(0, 1000, (latents.shape[0],), generator=generator).to(latents.device)

    def __call__(self) -> torch.Tensor:
        sample = self.noisy.clone().requires_grad_(True)
        with autocast_for(sample.device, self.dtype):
            prediction = self.unet(sample, self.timesteps, self.text).sample
        loss = F.mse_loss(prediction.float(), self.target.float())
        loss.backward()
        return loss.detach()


class PeerStep:
    """A step as diffusers' train_text_to_image_lora.py takes it (data loading included: its
    default is ``--dataloader_num_workers 0``, so decoding happens in the training process)."""

    def __init__(self, base: str, images: list[tuple[Path, str]], resolution: int, rank: int,
                 device: torch.device, dtype: torch.dtype, batch: int) -> None:
        from diffusers.training_utils import cast_training_params
        from peft import LoraConfig

        from trainer.config.schema import ModelConfig
        from trainer.models.loading import load_base_model

        self.device, self.dtype, self.batch, self.resolution = device, dtype, batch, resolution
        self.images = images
        # Loaded through our loader so a single file works too; the step below is the script's.
        model = load_base_model(ModelConfig(base=base))
        self.noise_scheduler, self.tokenizer = model.noise_scheduler, model.tokenizer
        self.text_encoder, self.vae, self.unet = model.text_encoder, model.vae, model.unet
        for module in (self.unet, self.vae, self.text_encoder):
            module.requires_grad_(False)
            module.to(device, dtype=dtype)
        self.frozen_unet = share_weights(self.unet)  # the floor's UNet: same tensors, no LoRA
        self.unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                         target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
        if dtype != torch.float32:
            cast_training_params(self.unet, dtype=torch.float32)
        self.lora_params = [p for p in self.unet.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.lora_params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
        self.rng = random.Random(0)
        self.generator = torch.Generator().manual_seed(0)

    def modules(self) -> list[torch.nn.Module]:
        return [self.unet, self.vae, self.text_encoder]

    def _batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        import numpy as np
        from PIL import Image

        pixels, captions = [], []
        for path, caption in self.rng.sample(self.images, self.batch):
            img = Image.open(path).convert("RGB")
            scale = self.resolution / min(img.size)  # transforms.Resize(resolution, BILINEAR)
            img = img.resize((round(img.width * scale), round(img.height * scale)), Image.BILINEAR)
            left, top = (img.width - self.resolution) // 2, (img.height - self.resolution) // 2  # CenterCrop
            img = img.crop((left, top, left + self.resolution, top + self.resolution))
            array = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)  # ToTensor
            pixels.append((array - 0.5) / 0.5)  # Normalize([0.5], [0.5])
            captions.append(caption)
        ids = self.tokenizer(captions, max_length=self.tokenizer.model_max_length, padding="max_length",
                             truncation=True, return_tensors="pt").input_ids
        return torch.stack(pixels).contiguous(), ids

    def __call__(self) -> float:
        pixel_values, input_ids = self._batch()
        pixel_values = pixel_values.to(self.device, dtype=self.dtype)
        latents = self.vae.encode(pixel_values).latent_dist.sample() * self.vae.config.scaling_factor
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                                  device=latents.device).long()
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        encoder_hidden_states = self.text_encoder(input_ids.to(self.device), return_dict=False)[0]
        with autocast_for(self.device, self.dtype):  # accelerator.prepare wraps the UNet's forward
            prediction = self.unet(noisy, timesteps, encoder_hidden_states, return_dict=False)[0]
        loss = F.mse_loss(prediction.float(), noise.float(), reduction="mean")
        train_loss = loss.item()  # the script logs every step
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.lora_params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad()
        return train_loss


def share_weights(unet: torch.nn.Module) -> torch.nn.Module:
    """A second UNet module tree over the same weight tensors (no extra memory)."""
    with torch.device("meta"):
        twin = type(unet).from_config(unet.config)
    twin.load_state_dict(unet.state_dict(), assign=True)
    twin.requires_grad_(False)
    return twin.eval()


class OursStep:
    """One optimiser step exactly as ``trainer.train.loop.train`` takes it."""

    def __init__(self, session: Any) -> None:
        from trainer.train.loop import optimizer_step

        self.session = session
        self._optimizer_step = optimizer_step
        self.params = [p for group in session.optimizer.param_groups for p in group["params"]]

    def __call__(self) -> float:
        return float(self._optimizer_step(self.session, self.params))  # the bench waits for the step to end


# --- sessions -------------------------------------------------------------------------------------


def ours_config(settings: BenchSettings, variant: Variant, base: str, data: Path, out: Path):
    from trainer.config.presets import resolve_config

    return resolve_config(None, None, {
        "base": base, "data": str(data), "resolution": settings.resolution, "batch_size": settings.batch,
        "rank": settings.rank, "alpha": settings.rank / 2, "targets": variant.targets,
        "train_text_encoder": variant.train_text_encoder, "cache_latents": variant.caching,
        "cache_text": variant.caching, "precision": settings.precision, "device": settings.device,
        # One output for all variants: they share the run folder's on-disk latent cache, so only the
        # first session pays for encoding (its time stands for every cached variant's epoch).
        "output": str(out / "bench.safetensors"), "seed": settings.seed, "epochs": 1000,
        "buckets": False,
    })


@dataclass
class OpenedSession:
    variant: Variant
    session: Any
    step: OursStep
    caching_seconds: float
    config: Any


def open_ours(settings: BenchSettings, variant: Variant, base: str, data: Path, out: Path, device: torch.device,
              log: Callable[[str], None], fresh_caching_seconds: float | None = None) -> OpenedSession:
    """Open a session and fill its caches; ``fresh_caching_seconds`` replaces the (cache-hit) time."""
    from trainer.train.session import open_session

    config = ours_config(settings, variant, base, data, out)
    start = time.perf_counter()
    session = open_session(config, lambda level, text: log(f"  [{level}] {text}") if level != "info" else None)
    log(f"  {variant.label}: session opened in {time.perf_counter() - start:.0f} s")
    if variant.caching and fresh_caching_seconds is None:
        caching = time_fresh_caching(session, device, rounds=2)
        log(f"  caching {len(session.training_set.items)} images took {caching:.1f} s (best of 2)")
    else:
        session.warm_caches(lambda level, text: None)  # a cache hit: the first session filled the disk cache
        caching = fresh_caching_seconds or 0.0
    return OpenedSession(variant, session, OursStep(session), caching if variant.caching else 0.0, config)


def time_fresh_caching(session: Any, device: torch.device, rounds: int) -> float:
    """Best time of ``rounds`` fills of empty latent and text caches, as a first run does them."""
    best = float("inf")
    for _ in range(rounds):
        clear_caches(session)
        seconds, _ = time_once(lambda: session.warm_caches(lambda level, text: None), device)
        best = min(best, seconds)
    return best


def clear_caches(session: Any) -> None:
    """Empty the session's caches, in memory and on disk (bench-only: reaches into their storage)."""
    if session.latent_cache is not None:
        session.latent_cache._memory.clear()
        if session.latent_cache.folder is not None:
            for path in session.latent_cache.folder.glob("*.safetensors"):
                path.unlink()
    if session.text_cache is not None:
        session.text_cache._memory.clear()


def session_modules(session: Any) -> list[torch.nn.Module]:
    m = session.model
    return [m.unet, m.text_encoder, m.vae]


def close(opened: OpenedSession) -> None:
    """Drop what accelerate holds of a session so its model can be freed."""
    opened.session.accelerator.free_memory()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --- the run ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    quiet_libraries()
    settings, json_path = parse_args(argv)
    device = resolve_device(settings.device)
    dtype = compute_dtype(settings.precision, device)
    log = print
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lora-studio-bench-") as tmp:
        tmp_path = Path(tmp)
        if settings.base:
            base = settings.base
        else:
            model_dir = Path(settings.model_dir) if settings.model_dir else tmp_path / "sd15-random"
            base = str(write_random_sd15(model_dir, seed=settings.seed, log=log))
        data = write_pattern_images(tmp_path / "data", settings.images, side=2 * settings.resolution)
        results = run(settings, base, data, tmp_path / "out", device, dtype, log)
    results["wall_seconds"] = round(time.perf_counter() - started, 1)
    print()
    print(report_text(results))
    if json_path:
        write_json(json_path, results)
        print(f"\nJSON written to {json_path}")
    return results


def run(settings: BenchSettings, base: str, data: Path, out: Path, device: torch.device, dtype: torch.dtype,
        log: Callable[[str], None]) -> dict[str, Any]:
    log(f"SD 1.5 architecture, {settings.resolution} px, batch {settings.batch}, rank {settings.rank}, "
        f"{str(dtype).replace('torch.', '')} on {device}; {settings.warmup} warm-up + {settings.rounds} rounds per case")
    images = sorted((p, p.with_suffix(".txt").read_text(encoding="utf-8")) for p in data.glob("*.jpg"))
    # The peer's model; the floor runs on a second module tree over the same frozen weights.
    peer = PeerStep(base, images, settings.resolution, settings.rank, device, dtype, settings.batch)
    rows, floor, floor_result, peer_result, batches, full_epoch = phase_matched(settings, base, data, out, device,
                                                                                dtype, peer, log)
    fresh_caching = rows[1]["caching_seconds"]
    if not settings.peer:
        rows = [r for r in rows if r["case"] != PEER]
        peer_result = None
    for key in settings.variants:
        if key == MATCHED:
            continue
        log(f"Phase 2: {VARIANTS[key].label} against the floor")
        opened = open_ours(settings, VARIANTS[key], base, data, out, device, log, fresh_caching)
        result = run_interleaved({"floor": floor, opened.variant.label: opened.step}, device,
                                 warmup=settings.warmup, rounds=settings.rounds, log=log)
        result["floor"].resident_bytes = floor_result.resident_bytes
        rows.append(ours_row(opened, result[opened.variant.label], result["floor"], peer_result, batches, device,
                             settings, peer_floor=floor_result))
        close(opened)
        del opened
    return {
        "benchmark": "train_step",
        "settings": asdict(settings),
        "model": "SD 1.5 architecture, random weights" if not settings.base else settings.base,
        "environment": environment(device),
        "dtype": str(dtype).replace("torch.", ""),
        "batches_per_epoch": batches,
        "rows": rows,
        "full_epoch_seconds": full_epoch,
        "summary": summary(rows),
    }


def phase_matched(settings: BenchSettings, base: str, data: Path, out: Path, device: torch.device,
                  dtype: torch.dtype, peer: PeerStep, log: Callable[[str], None]):
    """Floor, ours (attn, TE frozen, cached) and the peer, interleaved; the session is freed on return."""
    matched = open_ours(settings, VARIANTS[MATCHED], base, data, out, device, log)
    floor = make_floor(peer.frozen_unet, matched.session, settings, device, dtype)
    cases: dict[str, Callable[[], Any]] = {"floor": floor, matched.variant.label: matched.step}
    if settings.peer:
        cases[PEER] = peer
    log("Phase 1: floor / ours / peer, interleaved")
    results = run_interleaved(cases, device, warmup=settings.warmup, rounds=settings.rounds, log=log)
    floor_result = results["floor"]
    floor_result.resident_bytes = tensor_bytes([peer.frozen_unet], device=device)
    peer_result = results.get(PEER)
    if peer_result is not None:
        peer_result.resident_bytes = tensor_bytes(peer.modules(), peer.optimizer, device=device)
    batches = matched.session.batches_per_epoch
    rows = [row("floor", None, floor_result, floor_result, peer_result, batches, 0.0),
            ours_row(matched, results[matched.variant.label], floor_result, peer_result, batches, device, settings)]
    if peer_result is not None:
        rows.append(row(PEER, None, peer_result, floor_result, peer_result, batches, 0.0,
                        targets="attn", te="frozen", cache="no"))
    full_epoch = time_full_epochs(matched, peer if settings.peer else None, batches, device, log) \
        if settings.full_epoch else {}
    close(matched)
    return rows, floor, floor_result, peer_result, batches, full_epoch


def make_floor(unet: torch.nn.Module, session: Any, settings: BenchSettings, device: torch.device,
               dtype: torch.dtype) -> FloorStep:
    """The floor's inputs: the latent shape and text embeddings of the session's first batch."""
    unet.to(device)
    latent_side = settings.resolution // 8
    latents = torch.randn(settings.batch, 4, latent_side, latent_side, generator=torch.Generator().manual_seed(0))
    epoch, refs = 0, session.training_set.epoch_batches(0, settings.batch, settings.seed)[0]
    captions = [session.training_set.caption_for(ref, epoch, settings.seed) for ref in refs]
    with torch.no_grad():
        text = session.text_embeddings_for(captions)
    text = text[0] if isinstance(text, tuple) else text  # (hidden states, SDXL pooled)
    return FloorStep(unet, latents.to(device, dtype), text.to(device, dtype).detach(), dtype)


def row(name: str, variant: Variant | None, result: CaseResult, floor: CaseResult, peer: CaseResult | None,
        batches: int, caching: float, *, targets: str = "", te: str = "", cache: str = "",
        peer_floor: CaseResult | None = None) -> dict[str, Any]:
    """One table row; ratios to the peer go through the floor when the peer ran in another phase."""
    to_floor = result.best / floor.best
    to_peer = None
    if peer is not None:
        reference_floor = peer_floor or floor
        to_peer = to_floor / (peer.best / reference_floor.best)
    first_epoch = caching + batches * result.best if name != "floor" else None
    cached_epoch = batches * result.best if name != "floor" else None
    run = caching + RUN_EPOCHS * batches * result.best if name != "floor" else None
    return {
        "case": name, "targets": targets or (variant.targets if variant else ""),
        "text_encoder": te or ("trained" if variant and variant.train_text_encoder else ("frozen" if variant else "")),
        "caching": cache or (("yes" if variant.caching else "no") if variant else ""),
        "step_seconds": round(result.best, 3), "step_seconds_median": round(result.median, 3),
        "samples": [round(s, 3) for s in result.seconds], "cpu_seconds": [round(s, 3) for s in result.cpu_seconds],
        "spread": round(result.spread, 3), "x_floor": round(to_floor, 3),
        "x_peer": round(to_peer, 3) if to_peer is not None else None,
        "x_peer_measured_together": peer_floor is None and peer is not None,
        "caching_seconds": round(caching, 2),
        "epoch_seconds": round(first_epoch, 1) if first_epoch is not None else None,  # the first: caching + steps
        "cached_epoch_seconds": round(cached_epoch, 1) if cached_epoch is not None else None,
        f"run_{RUN_EPOCHS}_epochs_seconds": round(run, 1) if run is not None else None,
        "peak_bytes": result.peak_bytes, "resident_bytes": result.resident_bytes,
        "transient_bytes": result.transient_bytes,
    }


def ours_row(opened: OpenedSession, result: CaseResult, floor: CaseResult, peer: CaseResult | None, batches: int,
             device: torch.device, settings: BenchSettings,
             peer_floor: CaseResult | None = None) -> dict[str, Any]:
    from trainer.train.estimate import estimate_run

    s = opened.session
    result.resident_bytes = tensor_bytes(session_modules(s), s.optimizer, device=device)
    entry = row(opened.variant.label, opened.variant, result, floor, peer, batches, opened.caching_seconds,
                peer_floor=peer_floor)
    estimate = estimate_run(opened.config, s.model, device=device, num_images=len(s.training_set.items))
    # A shared CPU drifts ±15% between phases: the estimate is checked against the step at phase 1's
    # speed (this phase's ratio to its floor times phase 1's floor), not against the raw seconds.
    step_at_phase_1 = result.best / floor.best * (peer_floor or floor).best
    entry["estimate"] = {
        "peak_bytes": estimate.peak_memory_bytes, "step_seconds": round(estimate.step_seconds, 3),
        "caching_seconds": round(estimate.caching_seconds, 2), "step_flops": estimate.step_flops,
        "breakdown": estimate.breakdown,
        "peak_error": round(estimate.peak_memory_bytes / entry["peak_bytes"] - 1, 3),
        "step_error": round(estimate.step_seconds / step_at_phase_1 - 1, 3),
        "implied_flops_per_second": round(estimate.step_flops / entry["step_seconds"] / 1e9, 1),  # GFLOP/s
    }
    return entry


def time_full_epochs(matched: OpenedSession, peer: PeerStep | None, batches: int, device: torch.device,
                     log: Callable[[str], None]) -> dict[str, float]:
    """A whole epoch each (ours includes re-caching into an empty in-memory cache)."""
    out: dict[str, float] = {}
    clear_caches(matched.session)
    seconds, _ = time_once(lambda: (matched.session.warm_caches(lambda *_: None),
                                    [matched.step() for _ in range(batches)]), device)
    out["ours"] = round(seconds, 1)
    log(f"  full epoch, ours: {seconds:.1f} s")
    if peer is not None:
        seconds, _ = time_once(lambda: [peer() for _ in range(batches)], device)
        out["peer"] = round(seconds, 1)
        log(f"  full epoch, peer: {seconds:.1f} s")
    return out


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    by_case = {r["case"]: r for r in rows}
    matched = by_case[VARIANTS[MATCHED].label]
    peer = by_case.get(PEER)
    out: dict[str, Any] = {"ours_over_floor": matched["x_floor"], "ours_over_peer": matched["x_peer"]}
    if peer is not None:
        out["first_epoch_speedup_vs_peer"] = round(peer["epoch_seconds"] / matched["epoch_seconds"], 2)
        out["cached_epoch_speedup_vs_peer"] = round(peer["epoch_seconds"] / matched["cached_epoch_seconds"], 2)
        key = f"run_{RUN_EPOCHS}_epochs_seconds"
        out[f"run_{RUN_EPOCHS}_epochs_speedup_vs_peer"] = round(peer[key] / matched[key], 2)
    out["goal_step_le_1.10x_floor"] = matched["x_floor"] <= 1.10
    if peer is not None:
        out["goal_epoch_ge_1.3x_faster_than_peer"] = out["cached_epoch_speedup_vs_peer"] >= 1.3
    errors = [r["estimate"] for r in rows if "estimate" in r]
    out["estimator_max_abs_peak_error"] = max(abs(e["peak_error"]) for e in errors)
    out["estimator_max_abs_step_error"] = max(abs(e["step_error"]) for e in errors)
    return out


def report_text(results: dict[str, Any]) -> str:
    s = results["settings"]
    head = (f"{results['model']}, {s['resolution']} px, batch {s['batch']}, rank {s['rank']}, "
            f"{results['dtype']}, {results['environment']['device']}"
            f" ({results['environment']['torch_threads']} threads, load {results['environment'].get('load_average_1min')});"
            f" best and median of {s['rounds']} interleaved rounds after {s['warmup']} warm-up; "
            f"epoch = {s['images']} images = {results['batches_per_epoch']} steps + caching")
    headers = ["case", "step s (best)", "median", "× floor", "× peer", "caching s", "epoch 1 s", "epoch 2+ s",
               "peak GiB", "est. peak GiB (err)", "est. step s (err)"]
    table = []
    for r in results["rows"]:
        est = r.get("estimate")
        x_peer = None if r["x_peer"] is None else (f"{r['x_peer']:.2f}" + ("" if r["x_peer_measured_together"] else "*"))
        table.append([
            r["case"], r["step_seconds"], r["step_seconds_median"], f"{r['x_floor']:.2f}", x_peer,
            r["caching_seconds"] if r["epoch_seconds"] is not None else None, r["epoch_seconds"],
            r["cached_epoch_seconds"],
            f"{gib(r['peak_bytes']):.2f}",
            f"{gib(est['peak_bytes']):.2f} ({100 * est['peak_error']:+.0f}%)" if est else None,
            f"{est['step_seconds']:.2f} ({100 * est['step_error']:+.0f}%)" if est else None,
        ])
    lines = [head, "", format_table(headers, table),
             "* ratio to the peer derived through the floor (measured in a separate interleaved phase)"]
    sm = results["summary"]
    lines.append("")
    lines.append(f"step: ours / floor = {sm['ours_over_floor']:.2f} (goal ≤ 1.10)" +
                 (f", ours / peer = {sm['ours_over_peer']:.2f}" if sm.get("ours_over_peer") else ""))
    if sm.get("cached_epoch_speedup_vs_peer"):
        lines.append(f"epochs vs peer: first (with caching) {sm['first_epoch_speedup_vs_peer']:.2f}× faster, "
                     f"later (cached) {sm['cached_epoch_speedup_vs_peer']:.2f}× (goal ≥ 1.3×), "
                     f"a {RUN_EPOCHS}-epoch run {sm[f'run_{RUN_EPOCHS}_epochs_speedup_vs_peer']:.2f}×")
    lines.append(f"estimator: worst |error| peak {100 * sm['estimator_max_abs_peak_error']:.0f}%, "
                 f"step {100 * sm['estimator_max_abs_step_error']:.0f}% (goal ≤ 15%; steps at phase 1's speed)")
    if results.get("full_epoch_seconds"):
        lines.append(f"full epochs timed: {results['full_epoch_seconds']}")
    lines.append(f"total wall time {results.get('wall_seconds', 0):.0f} s")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
