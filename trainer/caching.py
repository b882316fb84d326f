"""Caches that take the VAE and (frozen) text encoder out of the steady-state training step.

Latents are cached on disk per (image content hash, bucket, flip) and VAE fingerprint, so an
edited image or another base model is re-encoded while an unchanged one never is, even across
runs. Text embeddings are cached in memory per caption when the text encoder is frozen and
captions don't change from step to step.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from trainer.atomic import atomic_path


def module_fingerprint(module: torch.nn.Module) -> str:
    """Cheap identity of a frozen module: its config plus a sample of every weight's values."""
    digest = hashlib.sha256()
    config = getattr(module, "config", None)
    if config is not None:
        digest.update(json.dumps(dict(config), sort_keys=True, default=str).encode())
    for name, param in module.state_dict().items():
        digest.update(name.encode())
        flat = param.detach().reshape(-1)
        digest.update(flat[:: max(1, flat.numel() // 64)][:64].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def encode_latents(vae, pixels: torch.Tensor) -> torch.Tensor:
    """Scaled latent means of a [B,3,H,W] batch in [-1,1] (the mean: deterministic, cacheable)."""
    dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    latents = dist.mean
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * vae.config.scaling_factor


class LatentCache:
    """Latents per (image hash, bucket, flip); in memory, and on disk when ``folder`` is set."""

    def __init__(self, vae, folder: Path | None) -> None:
        self.vae = vae
        self.folder = folder / module_fingerprint(vae) if folder else None
        self._memory: dict[str, torch.Tensor] = {}
        self.encoded = 0  # images run through the VAE by this cache (tests and benchmarks read it)

    def get(self, sha256: str, bucket: tuple[int, int], flip: bool, load_pixels: Callable[[], torch.Tensor]) -> torch.Tensor:
        key = f"{sha256}_{bucket[0]}x{bucket[1]}_{int(flip)}"
        if key in self._memory:
            return self._memory[key]
        path = self.folder / f"{key}.safetensors" if self.folder else None
        if path is not None and path.is_file():
            try:
                latents = load_file(str(path))["latents"]
            except Exception:  # a damaged cache entry is re-encoded, never fatal  # noqa: BLE001
                latents = None
            if latents is not None:
                self._memory[key] = latents
                return latents
        with torch.no_grad():
            latents = encode_latents(self.vae, load_pixels().unsqueeze(0))[0].float().cpu()
        self.encoded += 1
        if path is not None:
            with atomic_path(path) as tmp:
                save_file({"latents": latents.contiguous()}, str(tmp))
        self._memory[key] = latents
        return latents


class TextEmbeddingCache:
    """Embeddings per caption for a frozen text encoder (computed once, kept on CPU)."""

    def __init__(self, encode: Callable[[list[str]], torch.Tensor]) -> None:
        self._encode = encode
        self._memory: dict[str, torch.Tensor] = {}

    def get_batch(self, captions: list[str]) -> torch.Tensor:
        missing = [c for c in dict.fromkeys(captions) if c not in self._memory]
        if missing:
            with torch.no_grad():
                encoded = self._encode(missing).float().cpu()
            self._memory.update(zip(missing, encoded))
        return torch.stack([self._memory[c] for c in captions])
