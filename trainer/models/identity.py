"""Which weights a base model holds: a content hash of its weight files, computed once per file version.

A checkpoint resumed on other weights at the same path would continue silently, so the resume
fingerprint carries this hash. Each ``.safetensors`` weights file is hashed the way A1111's
``sshs_model_hash`` is (sha256 of the bytes after the header, so a rewritten metadata block does
not count as other weights); a diffusers folder's hash combines its unet, vae and text-encoder
files. Hashing a 7 GB SDXL file takes a while, so results are cached in a small JSON file keyed by
the file's path, size and modification time.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

from trainer.core.atomic import atomic_write_text
from trainer.core.errors import StudioError

WEIGHT_GLOBS = ("unet/*.safetensors", "vae/*.safetensors", "text_encoder*/*.safetensors")
CHUNK = 8 * 1024 * 1024


def tensor_bytes_sha256(path: Path) -> str:
    """sha256 of a safetensors file's bytes after its header (A1111's sshs_model_hash)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) == 8:
            (header_len,) = struct.unpack("<Q", head)
            if 8 + header_len <= path.stat().st_size:
                fh.seek(8 + header_len)
            else:
                fh.seek(0)  # not a safetensors layout: the whole file is its content
        else:
            fh.seek(0)
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def weight_files(source: Path) -> list[Path]:
    """The files whose bytes are a base model's weights (one for a single file)."""
    if source.is_file():
        return [source]
    return sorted({p for pattern in WEIGHT_GLOBS for p in source.glob(pattern) if p.is_file()})


def base_weights_hash(base: str, cache_file: Path | None = None) -> str | None:
    """Content hash of a local base model's weights; None for a hub id (its snapshot is content-addressed)."""
    source = Path(base).expanduser()
    if not source.exists():
        return None
    cache = _read_cache(cache_file)
    known = dict(cache)
    parts = []
    for path in weight_files(source):
        stat = path.stat()
        key = str(path.resolve())
        entry = cache.get(key)
        if not (isinstance(entry, dict) and entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns
                and isinstance(entry.get("sha256"), str)):
            entry = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": tensor_bytes_sha256(path)}
            cache[key] = entry
        relative = path.name if source.is_file() else path.relative_to(source).as_posix()
        parts.append(f"{relative}:{entry['sha256']}")
    if cache != known:
        _write_cache(cache_file, cache)
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _read_cache(cache_file: Path | None) -> dict:
    if cache_file is None:
        return {}
    try:
        data = json.loads(cache_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(cache_file: Path | None, cache: dict) -> None:
    if cache_file is None:
        return
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cache_file, json.dumps(cache, indent=1, sort_keys=True))
    except (OSError, StudioError):
        pass  # a cache that cannot be written only costs time on the next resume
