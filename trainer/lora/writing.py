"""Writing LoRA files: kohya/A1111 format (the default), diffusers' PEFT-key format, exact size.

The kohya file is what every tool reads (A1111/Forge, ComfyUI, diffusers' ``load_lora_weights``):
``<name>.lora_down.weight`` (A, [r, in] or [r, in, 1, 1]), ``<name>.lora_up.weight`` (B,
[out, r] or [out, r, 1, 1]) and a 0-dim ``<name>.alpha``, nothing else; every loader applies
``alpha / r`` with r read from the tensor shape. The exported alpha is therefore the layer's
*actual* scaling times r, which is alpha for plain LoRA and alpha·sqrt(r) for rsLoRA.

The header carries kohya's ``ss_*`` keys, the SAI ``modelspec.*`` keys and ``sshs_model_hash``,
the sha256 of the bytes after the header (A1111's LoRA hash), and stays under the 1 MiB ComfyUI
shows (``fit_header``). The diffusers-format file (``save_peft_lora``: what diffusers'
``save_lora_weights`` writes, used inside the ``name-peft/`` folder of ``trainer.lora.peft_folder``)
instead carries ``lora_adapter_metadata`` (r, lora_alpha, target modules), which diffusers turns
into the ``LoraConfig`` it injects, so alpha survives there too. The two never share a file:
diffusers refuses ``lora_adapter_metadata`` next to kohya alpha tensors.

Reading any LoRA file back (and ``LoraModule``, the in-memory layer both halves share) lives in
``trainer.lora.reading``; the header metadata in ``trainer.lora.metadata``.
"""

from __future__ import annotations

import collections
import hashlib
import json
import math
import secrets
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

import safetensors.torch
import torch
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer

from trainer.core.atomic import atomic_path
from trainer.core.errors import LoraFileError
from trainer.lora.inject import ADAPTER_NAME, lora_layers, module_in_out
from trainer.lora.layers import LoraModule
from trainer.lora.lycoris_keys import collect_lycoris, planned_parts
from trainer.lora.metadata import trim_tag_frequency
from trainer.lora.names import (
    KOHYA_PREFIXES,
    canonical_te_path,
    kohya_module_name,
    parse_kohya_module_name,
)

EXPORT_DTYPES: dict[str, torch.dtype] = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
_SAFETENSORS_DTYPE = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64"}
HASH_KEY = "sshs_model_hash"
PEFT_METADATA_KEY = "lora_adapter_metadata"  # diffusers' key; only ever in PEFT-format files
# Typical size of a small run's header metadata (short tag list, the hash); lora_file_size adds it when the
# real metadata is not known yet. Long tag-frequency lists add their JSON length on top.
METADATA_ESTIMATE_BYTES = 3200
# ComfyUI's /view_metadata gives up on a header longer than this; ss_tag_frequency is trimmed to fit.
VIEWABLE_HEADER_BYTES = 1024 * 1024


class LoraShape(NamedTuple):
    """What the file size depends on: a layer's kohya name, widths, whether it is a conv (and its
    kernel), and, where they differ from the file's, its rank and adapter type."""

    name: str
    in_features: int
    out_features: int
    conv: bool
    kernel: tuple[int, ...] = ()  # () for a Linear, (1, 1) or (3, 3) for a conv
    rank: int = 0  # 0: the rank given to lora_file_size
    kind: str = "lora"  # lora (and locon), dora, loha, lokr
    alpha: float | None = None  # None: the alpha given to lora_file_size


# --- from a trained model ------------------------------------------------------------------------


def collect_lora_modules(component: str, model: torch.nn.Module, family: str,
                         adapter_name: str = ADAPTER_NAME) -> list:
    """The adapter weights of one peft-injected component as kohya modules (fp32 copies, sorted)."""
    modules = []
    for path, layer in lora_layers(model).items():
        name = kohya_module_name(component, path, family)
        if not isinstance(layer, LoraLayer):
            if (module := collect_lycoris(name, layer, adapter_name)) is not None:
                modules.append(module)
            continue
        if adapter_name not in layer.lora_A:
            continue
        rank = int(layer.r[adapter_name])
        down = layer.lora_A[adapter_name].weight.detach().float().cpu().clone()
        magnitude = None
        if adapter_name in getattr(layer, "lora_magnitude_vector", {}):
            weight = layer.lora_magnitude_vector[adapter_name].weight.detach().float().cpu().clone()
            magnitude = weight.reshape(-1, *[1] * (down.dim() - 1))  # LyCORIS wd_on_out: [out, 1(, 1, 1)]
        modules.append(LoraModule(
            name=name,
            down=down,
            up=layer.lora_B[adapter_name].weight.detach().float().cpu().clone(),
            alpha=_exported_alpha(layer, adapter_name, rank),
            dora_scale=magnitude,
        ))
    if component == "text_encoder_2":
        _check_complete_attention(modules)
    return sorted(modules, key=lambda m: m.name)


def lora_shapes(component: str, model: torch.nn.Module, module_paths: Iterable[str], family: str,
                kind: str = "lora", ranks: dict[str, tuple[int, float]] | None = None) -> list[LoraShape]:
    """Shapes of the layers a plan targets (works on meta-device models: nothing is allocated)."""
    named = dict(model.named_modules())
    shapes = []
    for path in module_paths:
        module = named[path]
        base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
        in_features, out_features = module_in_out(base)
        conv = isinstance(base, torch.nn.Conv2d)
        rank, alpha = (ranks or {}).get(path, (0, None))
        shapes.append(LoraShape(kohya_module_name(component, path, family), in_features, out_features, conv,
                                tuple(base.kernel_size) if conv else (), rank, kind, alpha))
    return shapes


def module_shape(module: LoraModule, own_rank: bool = False) -> LoraShape:
    """The shape of a LoRA/LoCon/DoRA module; ``own_rank`` records its rank and alpha instead of the file's."""
    kernel = tuple(module.down.shape[2:])
    rank, alpha = (module.rank, module.alpha) if own_rank else (0, None)
    kind = "dora" if module.kind == "dora" else "lora"
    return LoraShape(module.name, int(module.down.shape[1]), int(module.up.shape[0]), module.is_conv, kernel,
                     rank, kind, alpha)


def _exported_alpha(layer: LoraLayer, adapter_name: str, rank: int) -> float:
    # From the layer's real scaling, so rsLoRA (alpha/sqrt(r)) exports alpha·sqrt(r).
    alpha = float(layer.scaling[adapter_name]) * rank
    return round(alpha, 6) if abs(alpha - round(alpha, 6)) < 1e-9 * max(1.0, alpha) else alpha


def _check_complete_attention(modules: list[LoraModule]) -> None:
    # A1111 skips an SDXL TE2 layer unless q, k, v and out_proj all carry LoRA.
    by_layer: dict[str, set[str]] = collections.defaultdict(set)
    for m in modules:
        head, _, tail = m.name.rpartition("_self_attn_")
        if head:
            by_layer[head].add(tail)
    for layer, parts in by_layer.items():
        if parts != {"q_proj", "k_proj", "v_proj", "out_proj"}:
            raise LoraFileError(f"{layer} has LoRA on {sorted(parts)} only; A1111 ignores partial sets.",
                                hint="Target q, k, v and out_proj together for the second text encoder.")


# --- kohya export --------------------------------------------------------------------------------


def kohya_state_dict(modules: Iterable, dtype: str = "fp16") -> dict[str, torch.Tensor]:
    """The tensors of a kohya/LyCORIS file; refuses duplicate names, bad shapes and NaN/Inf (after casting)."""
    torch_dtype = _export_dtype(dtype)
    tensors: dict[str, torch.Tensor] = {}
    for module in modules:
        _check_module(module)
        if f"{module.name}.alpha" in tensors:
            raise LoraFileError(f"Two LoRA modules are both named {module.name}.")
        for label, tensor in module.tensors().items():
            tensor = tensor.detach().to("cpu", torch_dtype).contiguous()
            if not torch.isfinite(tensor).all():
                raise LoraFileError(
                    f"{module.name}.{label} has NaN or infinite values in {dtype}; nothing was written.",
                    hint="Training diverged (lower the learning rate), or export as bf16/fp32 if values overflow fp16.")
            tensors[f"{module.name}.{label}"] = tensor
        tensors[f"{module.name}.alpha"] = torch.tensor(module.alpha, dtype=_alpha_dtype(module.alpha, torch_dtype))
    if not tensors:
        raise LoraFileError("There are no LoRA layers to export.", hint="Check that LoRA was injected.")
    return tensors


def save_kohya_lora(modules: Iterable[LoraModule], metadata: dict[str, str], path: str | Path,
                    dtype: str = "fp16") -> int:
    """Write a kohya/A1111 LoRA file atomically with ``sshs_model_hash``; returns its size in bytes.

    A header over ``VIEWABLE_HEADER_BYTES`` (a dataset with thousands of distinct tags) loses its
    rarest ``ss_tag_frequency`` entries until it fits.
    """
    path = Path(path)
    header_meta = _checked_metadata(metadata)
    tensors = kohya_state_dict(modules, dtype)
    header_meta = fit_header(header_meta, _tensor_entries(tensors))
    # The hash covers the tensor bytes, which follow the header; write a unique same-length
    # placeholder, hash what follows the header, then patch the placeholder in place.
    placeholder = secrets.token_hex(32)
    header_meta[HASH_KEY] = placeholder
    with atomic_path(path) as tmp:
        safetensors.torch.save_file(tensors, str(tmp), metadata=header_meta)
        _patch_model_hash(tmp, placeholder)
    return path.stat().st_size


def fit_header(metadata: dict[str, str], entries: list[tuple]) -> dict[str, str]:
    """``metadata`` (no hash key), trimmed so that the file's header stays viewable in ComfyUI."""
    for _ in range(8):  # each pass removes at least the measured excess; one pass is the rule
        excess = _header_length(entries, metadata) - VIEWABLE_HEADER_BYTES
        if excess <= 0:
            break
        trimmed = trim_tag_frequency(metadata, excess)
        if trimmed == metadata:
            break  # nothing left to trim: the tensor index alone is that large
        metadata = trimmed
    return metadata


def tensor_data_sha256(path: str | Path) -> str:
    """sha256 of a safetensors file's bytes after the 8-byte length and the header."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
        fh.seek(8 + header_len)
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _patch_model_hash(path: Path, placeholder: str) -> None:
    digest = tensor_data_sha256(path)
    with open(path, "r+b") as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
        header = fh.read(header_len)
        marker = placeholder.encode("ascii")
        if header.count(marker) != 1:
            raise RuntimeError("hash placeholder not found exactly once in the safetensors header")
        fh.seek(8 + header.index(marker))
        fh.write(digest.encode("ascii"))
        fh.seek(8)
        written = json.loads(fh.read(header_len))["__metadata__"][HASH_KEY]
    if written != digest or tensor_data_sha256(path) != digest:
        raise RuntimeError("sshs_model_hash does not match the file just written")


def _checked_metadata(metadata: dict[str, str]) -> dict[str, str]:
    bad = {k: type(v).__name__ for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)}
    if bad:
        raise TypeError(f"safetensors metadata values must be strings: {bad}")
    if PEFT_METADATA_KEY in metadata:
        raise ValueError(f"'{PEFT_METADATA_KEY}' next to kohya alpha tensors makes diffusers refuse the file")
    return {k: v for k, v in metadata.items() if k != HASH_KEY}


def _export_dtype(dtype: str) -> torch.dtype:
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"export dtype must be one of {list(EXPORT_DTYPES)}, got {dtype!r}")
    return EXPORT_DTYPES[dtype]


def _alpha_dtype(alpha: float, weight_dtype: torch.dtype) -> torch.dtype:
    # kohya stores alpha in the weights' dtype; keep fp32 when that would round it (rsLoRA's
    # alpha·sqrt(r)) so the loaders' alpha/r stays exact. Every loader reads it with .item().
    return weight_dtype if torch.tensor(alpha, dtype=weight_dtype).item() == alpha else torch.float32


def _check_module(module) -> None:
    if not module.name.startswith(KOHYA_PREFIXES) or "." in module.name:
        raise ValueError(f"{module.name!r} is not a kohya module name")
    if isinstance(module, LoraModule):
        down, up = module.down, module.up
        if down.dim() not in (2, 4) or up.dim() != down.dim() or up.shape[1] != down.shape[0] or up.shape[2:] not in (
                torch.Size([]), torch.Size([1, 1])):
            raise ValueError(f"{module.name}: down {tuple(down.shape)} and up {tuple(up.shape)} do not form a LoRA pair")
    if not (math.isfinite(module.alpha) and module.alpha > 0):
        raise LoraFileError(f"{module.name} has alpha {module.alpha}; it must be a positive number.")


# --- diffusers/PEFT export -----------------------------------------------------------------------


def save_peft_lora(modules: Iterable[LoraModule], path: str | Path, dtype: str = "fp16",
                   metadata: dict[str, str] | None = None) -> int:
    """Write the diffusers/PEFT format (``unet.<path>.lora_A.weight`` …) with alpha preserved.

    diffusers builds its ``LoraConfig`` from the ``lora_adapter_metadata`` header entry, so r,
    lora_alpha (exported alpha: the effective scale is alpha/r) and the target modules go there.
    """
    modules = list(modules)
    if any(getattr(m, "kind", "lora") not in ("lora", "locon") for m in modules):
        raise LoraFileError("The diffusers/PEFT-format copy holds plain LoRA only; this network is "
                            f"{min({m.kind for m in modules} - {'lora', 'locon'})}.",
                            hint="Turn export_peft off: the .safetensors file (kohya/LyCORIS keys) loads in every UI.")
    kohya = kohya_state_dict(modules, dtype)  # same checks and casts as the kohya export
    tensors: dict[str, torch.Tensor] = {}
    per_component: dict[str, dict[str, tuple[int, float]]] = collections.defaultdict(dict)
    for module in modules:
        component, module_path = parse_kohya_module_name(module.name)
        # "text_model." keeps older transformers happy; diffusers strips it where the model lacks it
        key_path = module_path if component == "unet" else "text_model." + canonical_te_path(module_path)
        tensors[f"{component}.{key_path}.lora_A.weight"] = kohya.pop(f"{module.name}.lora_down.weight")
        tensors[f"{component}.{key_path}.lora_B.weight"] = kohya.pop(f"{module.name}.lora_up.weight")
        per_component[component][module_path] = (module.rank, module.alpha)
    adapter_meta = {}
    for component, layers in per_component.items():
        for key, value in _peft_config(layers).items():
            adapter_meta[f"{component}.{key}"] = value
    header = {k: v for k, v in (metadata or {}).items() if k != HASH_KEY}
    _checked_metadata(header)
    header.update({"format": "pt", PEFT_METADATA_KEY: json.dumps(adapter_meta, indent=2, sort_keys=True)})
    path = Path(path)
    with atomic_path(path) as tmp:
        safetensors.torch.save_file(tensors, str(tmp), metadata=header)
    return path.stat().st_size


def _peft_config(layers: dict[str, tuple[int, float]]) -> dict:
    """``LoraConfig`` kwargs: the most common rank/alpha plus per-module patterns for the rest."""
    rank = collections.Counter(r for r, _ in layers.values()).most_common(1)[0][0]
    alpha = collections.Counter(a for _, a in layers.values()).most_common(1)[0][0]
    return {
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": sorted(layers),
        "rank_pattern": {path: r for path, (r, _) in layers.items() if r != rank},
        "alpha_pattern": {path: a for path, (_, a) in layers.items() if a != alpha},
        "use_rslora": False,  # alpha is already the exported alpha: scale = alpha / r
        "use_dora": False,
        "lora_bias": False,
    }


# --- exact file size -----------------------------------------------------------------------------


def lora_file_size(shapes: Iterable[LoraShape], rank: int, dtype: str = "fp16", alpha: float = 1.0,
                   metadata: dict[str, str] | None = None) -> int:
    """The exact byte size ``save_kohya_lora`` will write for these layers.

    Built like safetensors builds its header (compact JSON, tensors ordered by dtype size then
    name, padded with spaces to a multiple of 8). ``alpha`` matters only through its dtype (see
    ``_alpha_dtype``). Without ``metadata`` the size includes ``METADATA_ESTIMATE_BYTES`` instead
    and is exact to within the metadata's deviation from it (a few hundred bytes, plus tag lists).
    """
    torch_dtype = _export_dtype(dtype)
    entries = []  # (itemsize, name, dtype string, shape)
    weight_type = _SAFETENSORS_DTYPE[torch_dtype]
    for shape in shapes:
        r = shape.rank or rank
        module_alpha = alpha if shape.alpha is None else shape.alpha
        kernel = shape.kernel or ((1, 1) if shape.conv else ())
        if shape.kind in ("loha", "lokr"):
            parts = planned_parts(shape.kind, r, shape.out_features, shape.in_features, kernel)
        else:
            ones = [1] * len(kernel)
            parts = [("lora_down.weight", [r, shape.in_features, *kernel]),
                     ("lora_up.weight", [shape.out_features, r, *ones])]
            if shape.kind == "dora":
                parts.append(("dora_scale", [shape.out_features, 1, *ones]))
        entries += [(torch_dtype.itemsize, f"{shape.name}.{suffix}", weight_type, dims) for suffix, dims in parts]
        alpha_dtype = _alpha_dtype(module_alpha, torch_dtype)
        entries.append((alpha_dtype.itemsize, f"{shape.name}.alpha", _SAFETENSORS_DTYPE[alpha_dtype], []))
    data_bytes = sum(itemsize * math.prod(shape) for itemsize, _, _, shape in entries)
    if metadata is None:
        return 8 + (_header_length(entries, None) + METADATA_ESTIMATE_BYTES + 7) // 8 * 8 + data_bytes
    header_meta = fit_header(_checked_metadata(metadata), entries)
    return 8 + (_header_length(entries, header_meta) + 7) // 8 * 8 + data_bytes


def _tensor_entries(tensors: dict[str, torch.Tensor]) -> list[tuple]:
    return [(t.dtype.itemsize, name, _SAFETENSORS_DTYPE[t.dtype], list(t.shape)) for name, t in tensors.items()]


def _header_length(entries: list[tuple], metadata: dict[str, str] | None) -> int:
    """Bytes of the JSON header safetensors writes (before its padding to a multiple of 8).

    Built as safetensors builds it: compact JSON, tensors ordered by dtype size then name.
    """
    header: dict = {}
    if metadata is not None:
        header["__metadata__"] = {**metadata, HASH_KEY: "0" * 64}
    offset = 0
    for itemsize, name, dtype_name, shape in sorted(entries, key=lambda e: (-e[0], e[1])):
        end = offset + itemsize * math.prod(shape)
        header[name] = {"dtype": dtype_name, "shape": shape, "data_offsets": [offset, end]}
        offset = end
    return len(json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))
