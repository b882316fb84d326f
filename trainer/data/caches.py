"""Caches that take the VAE and (frozen) text encoder out of the steady-state training step.

Latents are cached on disk per (image content hash, bucket, flip) and VAE fingerprint, so an
edited image or another base model is re-encoded while an unchanged one never is, even across
runs; each entry also keeps the crop and original size SDXL's size conditioning needs, and with
masked loss the latent-sized mask (the key then names the mask too: an edited mask is re-read),
so a cached image is never decoded again. Text embeddings (for SDXL: hidden states and pooled
embedding) are cached in memory per caption when the text encoders are frozen and captions
don't change from step to step.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from trainer.core.atomic import atomic_path
from trainer.core.safetensors_header import load_safetensors
from trainer.data.masks import latent_mask


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


@dataclass(frozen=True)
class LatentEntry:
    """One encoded image variant and the geometry that produced it (SDXL's ``add_time_ids``)."""

    latents: torch.Tensor  # [C, h, w], fp32, on the cache's device
    crop_top_left: tuple[int, int]  # (y, x) in the scaled image
    original_size: tuple[int, int]  # (h, w) before scaling
    mask: torch.Tensor | None = None  # [1, h, w] loss weights on the latent grid (masked loss), or None


PixelLoader = Callable[[], tuple[torch.Tensor, tuple[int, int], tuple[int, int]]]  # TrainingSet.load_pixels
MaskLoader = Callable[[], torch.Tensor | None]  # TrainingSet.load_mask: [H, W] at pixel size, or None


class LatentCache:
    """Latents per (image hash, bucket, flip); in memory, and on disk when ``folder`` is set."""

    def __init__(self, vae, folder: Path | None) -> None:
        self.vae = vae
        self.folder = folder / module_fingerprint(vae) if folder else None
        self._memory: dict[str, LatentEntry] = {}
        self.encoded = 0  # images run through the VAE by this cache (tests and benchmarks read it)
        self.device = torch.device("cpu")  # where the entries in memory live

    def to(self, device: torch.device) -> None:
        """Keep the entries on ``device`` (a few MB: the training step then copies nothing)."""
        self.device = device
        self._memory = {key: replace(entry, latents=entry.latents.to(device),
                                     mask=None if entry.mask is None else entry.mask.to(device))
                        for key, entry in self._memory.items()}

    def get(self, sha256: str, bucket: tuple[int, int], flip: bool, load_pixels: PixelLoader,
            mask_key: str = "", load_mask: MaskLoader | None = None) -> LatentEntry:
        """The entry of one (image, bucket, flip); with ``mask_key`` (the mask's identity) it holds
        the mask too, read through ``load_mask``."""
        key = f"{sha256}_{bucket[0]}x{bucket[1]}_{int(flip)}" + (f"_{mask_key}" if mask_key else "")
        if key in self._memory:
            return self._memory[key]
        path = self.folder / f"{key}.safetensors" if self.folder else None
        if path is not None and path.is_file():
            try:
                stored, _ = load_safetensors(path)
                entry = LatentEntry(stored["latents"].to(self.device), tuple(stored["crop_top_left"].tolist()),
                                    tuple(stored["original_size"].tolist()),
                                    stored["mask"].to(self.device) if "mask" in stored else None)
            except Exception:  # a damaged (or older, size-less) entry is re-encoded, never fatal  # noqa: BLE001
                entry = None
            if entry is not None:
                self._memory[key] = entry
                return entry
        pixels, crop_top_left, original_size = load_pixels()
        with torch.no_grad():
            latents = encode_latents(self.vae, pixels.unsqueeze(0))[0].float().cpu()
        self.encoded += 1
        pixel_mask = load_mask() if (mask_key and load_mask is not None) else None
        mask = None if pixel_mask is None else latent_mask(pixel_mask, tuple(latents.shape[-2:])).contiguous()
        if path is not None:
            tensors = {"latents": latents.contiguous(), "crop_top_left": torch.tensor(crop_top_left),
                       "original_size": torch.tensor(original_size)}
            with atomic_path(path) as tmp:
                save_file(tensors if mask is None else {**tensors, "mask": mask}, str(tmp))
        entry = LatentEntry(latents.to(self.device), tuple(crop_top_left), tuple(original_size),
                            None if mask is None else mask.to(self.device))
        self._memory[key] = entry
        return entry


TextEncoding = torch.Tensor | tuple[torch.Tensor, ...]  # a batch: hidden states, or (hidden, pooled) for SDXL


class TextEmbeddingCache:
    """Embeddings per caption for frozen text encoders (computed once, kept on the host or the device).

    ``encode`` returns a batch tensor, or a tuple of batch tensors (SDXL's hidden states and
    pooled embedding); ``get_batch`` returns the same structure for the captions asked.
    """

    def __init__(self, encode: Callable[[list[str]], TextEncoding]) -> None:
        self._encode = encode
        self._memory: dict[str, tuple[torch.Tensor, ...]] = {}
        self._is_tuple = False
        self.device = torch.device("cpu")  # where the embeddings in memory live

    def to(self, device: torch.device) -> None:
        """Keep the embeddings on ``device`` (tens of MB at most for a few hundred captions)."""
        self.device = device
        self._memory = {caption: tuple(part.to(device) for part in parts) for caption, parts in self._memory.items()}

    def get_batch(self, captions: list[str]) -> TextEncoding:
        missing = [c for c in dict.fromkeys(captions) if c not in self._memory]
        if missing:
            with torch.no_grad():
                encoded = self._encode(missing)
            self._is_tuple = isinstance(encoded, tuple)
            parts = [part.float().to(self.device) for part in (encoded if self._is_tuple else (encoded,))]
            self._memory.update(zip(missing, zip(*parts)))
        stacked = tuple(torch.stack(part) for part in zip(*(self._memory[c] for c in captions)))
        return stacked if self._is_tuple else stacked[0]
