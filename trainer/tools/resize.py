"""Rewrite LoRA files: resize by truncated SVD, merge several into one.

Resize: each layer's ΔW = (α/r)·B·A is replaced by its best rank-k approximation (Eckart–Young:
the truncated SVD), k fixed or chosen per layer as the smallest rank that keeps a fraction of
‖ΔW‖²_F ("energy"). The new factors carry √σ each and alpha = k, so the file's scale is 1 and
every loader applies exactly the truncated ΔW.

Merge: Σ wᵢ·ΔWᵢ is exactly representable by stacking the factors, B = [w₁s₁B₁ | w₂s₂B₂ | …],
A = [A₁; A₂; …], alpha = the summed rank (scale 1). That file is as large as the inputs together;
with a target rank (or energy) the stack is truncated by the same SVD as resize.

Both write through ``trainer.lora.writing.save_kohya_lora``, so the output is an ordinary kohya file with a
fresh ``sshs_model_hash`` that loads everywhere an export does.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.core.errors import ConfigError, LoraFileError
from trainer.core.output_paths import check_output_file
from trainer.lora.reading import LoraModule, read_lora_file
from trainer.lora.sidecars import derive_sidecars
from trainer.lora.writing import (
    EXPORT_DTYPES,
    HASH_KEY,
    PEFT_METADATA_KEY,
    save_kohya_lora,
)
from trainer.tools.fit import check_fits
from trainer.tools.svd import LowRankSVD, lowrank_svd

FAMILY_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}
FAMILY_ARCHITECTURE = {"sd1": "stable-diffusion-v1/lora", "sd2": "stable-diffusion-v2-512/lora",
                       "sdxl": "stable-diffusion-xl-v1-base/lora"}


@dataclass(frozen=True)
class LayerResize:
    name: str
    old_rank: int
    new_rank: int
    energy: float  # ‖ΔW‖²_F before
    energy_kept: float  # fraction of it the new layer keeps


@dataclass(frozen=True)
class ResizeReport:
    path: Path
    layers: tuple[LayerResize, ...]
    size_bytes: int
    source_bytes: int
    sidecars: tuple[Path, ...] = ()  # A1111 name.json / name.preview.png written next to it

    @property
    def energy_kept(self) -> float:
        """Fraction of the whole file's Σ‖ΔW‖²_F kept (large layers weigh more)."""
        total = sum(layer.energy for layer in self.layers)
        return 1.0 if total == 0 else sum(layer.energy * layer.energy_kept for layer in self.layers) / total

    def text(self) -> str:
        ranks = sorted({layer.new_rank for layer in self.layers})
        worst = min(self.layers, key=lambda layer: layer.energy_kept)
        rank_text = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}–{ranks[-1]} (per layer)"
        return (f"Wrote {self.path} ({self.size_bytes / 1e6:.2f} MB, was {self.source_bytes / 1e6:.2f} MB): "
                f"{len(self.layers)} layers at rank {rank_text}; energy kept {self.energy_kept:.2%} overall, "
                f"lowest {worst.energy_kept:.2%} ({worst.name}).")


@dataclass(frozen=True)
class MergeReport:
    path: Path
    sources: tuple[tuple[str, float], ...]  # (file name, weight)
    layers: int
    ranks: tuple[int, int]  # (smallest, largest) rank in the output
    energy_kept: float  # 1.0 for an exact (concatenating) merge
    size_bytes: int
    sidecars: tuple[Path, ...] = ()  # A1111 name.json / name.preview.png written next to it

    def text(self) -> str:
        made = " + ".join(f"{weight:g}×{name}" for name, weight in self.sources)
        rank_text = str(self.ranks[0]) if self.ranks[0] == self.ranks[1] else f"{self.ranks[0]}–{self.ranks[1]}"
        how = "exact" if self.energy_kept == 1.0 else f"SVD, energy kept {self.energy_kept:.2%}"
        return (f"Wrote {self.path} ({self.size_bytes / 1e6:.2f} MB) = {made}: {self.layers} layers, "
                f"rank {rank_text} ({how}).")


def resize_lora(source: str | Path, out: str | Path, *, rank: int | None = None, energy: float | None = None,
                dtype: str | None = None, sidecars: bool = True, base: str | None = None,
                base_config: str = "") -> ResizeReport:
    """Truncate every layer to ``rank``, or to the smallest rank keeping ``energy`` of it (both: rank caps).

    With ``sidecars`` the output gets the source's A1111 card (trigger, base model, preview) plus a note.
    The file must fit ``base`` when one is given, else its family's layout (``tools.fit``).
    """
    check_target(rank, energy, required=True)
    out = check_output_file(out, suffix=".safetensors", label="The resized LoRA", inputs=[("LoRA file", source)])
    file = read_lora_file(source)
    check_fits(file, base, base_config)
    refuse_non_lora(file, "resized")
    top = max(module.rank for module in file.modules.values())
    if rank is not None and energy is None and rank > top:  # it would write a same-size copy under a new rank's name
        raise ConfigError(f"{file.path.name} has rank {top}; resizing it to rank {rank} would not make it smaller.",
                          hint=f"Choose a rank below {top}, or an energy to keep such as 0.95.")
    modules, layers = [], []
    for name, module in sorted(file.modules.items()):
        svd = lowrank_svd(module.up, module.down, module.alpha / module.rank)
        new_rank = target_rank(svd, module.rank if rank is None else min(rank, module.rank), energy)
        modules.append(_truncated(name, svd, new_rank, module))
        layers.append(LayerResize(name, module.rank, new_rank, svd.energy, svd.energy_kept(new_rank)))
    ranks = sorted({m.rank for m in modules})
    old = sorted({m.rank for m in file.modules.values()})
    comment = (f"resized from rank {_range(old)} to {_range(ranks)} by LoRA Studio "
               f"({'energy ' + format(energy, 'g') if energy else 'fixed rank'})")
    metadata = output_metadata(file.metadata, file.family, out, ranks, comment)
    size = save_kohya_lora(modules, metadata, out, dtype=dtype or _storable_dtype(file.dtype))
    note = comment[:1].upper() + comment[1:] + "."
    written = derive_sidecars(out, [(file.path, file.metadata, file.family)], note=note) if sidecars else []
    return ResizeReport(out, tuple(layers), size, file.path.stat().st_size, tuple(written))


def refuse_non_lora(file, action: str) -> None:
    """SVD resizing and merging work on ΔW = scale·B·A; LoHa/LoKr have no B·A, DoRA's update depends on W0."""
    kind = file.network_type
    if kind in ("lora", "locon"):
        return
    label = {"dora": "DoRA", "loha": "LoHa", "lokr": "LoKr"}.get(kind, kind)
    raise LoraFileError(f"{file.path.name} is a {label} network ({kind}); it cannot be {action} by SVD, which "
                        "works on a LoRA's low-rank update B·A.",
                        hint="Use it as it is (Generate and bake read it), or train a lora/locon network to resize it.")


def merge_loras(sources: Sequence[tuple[str | Path, float]], out: str | Path, *, rank: int | None = None,
                energy: float | None = None, dtype: str | None = None, sidecars: bool = True,
                base: str | None = None, base_config: str = "") -> MergeReport:
    """Σ weightᵢ·LoRAᵢ as one file: exact (ranks concatenated) unless ``rank``/``energy`` ask for an SVD.

    With ``sidecars`` the output gets an A1111 card: every input's trigger, the first input's preview.
    """
    if not sources:
        raise ConfigError("Give at least one LoRA file to merge.")
    check_target(rank, energy, required=False)
    out = check_output_file(out, suffix=".safetensors", label="The merged LoRA",
                            inputs=[("LoRA file", path) for path, _ in sources])
    files = [(read_lora_file(path), float(weight)) for path, weight in sources]
    for file, _ in files:
        check_fits(file, base, base_config)
        refuse_non_lora(file, "merged")
    family = _common_family(files)
    stacks: dict[str, list[tuple[LoraModule, float]]] = {}
    for file, weight in files:
        for name, module in file.modules.items():
            stacks.setdefault(name, []).append((module, weight))
    modules, kept, total = [], 0.0, 0.0
    for name, parts in sorted(stacks.items()):
        _check_same_layer(name, parts, files)
        up = torch.cat([w * (m.alpha / m.rank) * m.up.double() for m, w in parts], dim=1)
        down = torch.cat([m.down.double() for m, _ in parts], dim=0)
        if rank is None and energy is None:
            if len(parts) == 1 and parts[0][1] == 1.0:
                modules.append(parts[0][0])  # untouched: keep the file's own numbers bit for bit
            else:
                modules.append(LoraModule(name, down, up, float(down.shape[0])))
            continue
        svd = lowrank_svd(up, down)
        new_rank = target_rank(svd, rank or down.shape[0], energy)
        modules.append(_truncated(name, svd, new_rank, parts[0][0]))
        kept += svd.energy * svd.energy_kept(new_rank)
        total += svd.energy
    ranks = sorted({m.rank for m in modules})
    names = [(file.path.name, weight) for file, weight in files]
    base_meta = {k: v for k, v in files[0][0].metadata.items() if k.startswith(("ss_base_model_version", "ss_v2",
                                                                                 "modelspec.architecture"))}
    metadata = output_metadata(base_meta, family, out, ranks, "merged by LoRA Studio: " + ", ".join(
        f"{weight:g}×{name}" for name, weight in names))
    metadata["ss_merged_from"] = json.dumps([
        {"file": file.path.name, "weight": weight, HASH_KEY: file.metadata.get(HASH_KEY, "")} for file, weight in files])
    phrases = [p for file, _ in files if (p := file.metadata.get("modelspec.trigger_phrase", "").strip())]
    if phrases:
        metadata["modelspec.trigger_phrase"] = ", ".join(dict.fromkeys(phrases))
    output_dtype = dtype or _widest([file.dtype for file, _ in files])
    size = save_kohya_lora(modules, metadata, out, dtype=output_dtype)
    energy_kept = 1.0 if rank is None and energy is None else (kept / total if total else 1.0)
    made = " + ".join(f"{weight:g}×{name}" for name, weight in names)
    written = derive_sidecars(out, [(file.path, file.metadata, file.family) for file, _ in files],
                              note=f"Merged by LoRA Studio: {made}.", description=f"Merge of {made}.") if sidecars else []
    return MergeReport(out, tuple(names), len(modules), (ranks[0], ranks[-1]), energy_kept, size, tuple(written))


# --- helpers -------------------------------------------------------------------------------------


def check_target(rank: int | None, energy: float | None, *, required: bool) -> None:
    """Validate a target rank / energy fraction (shared by resize, merge and extract)."""
    if required and rank is None and energy is None:
        raise ConfigError("Say how small the LoRA should get.",
                          hint="Give a target rank (--rank 16) or an energy to keep (--energy 0.95), or both.")
    if rank is not None and rank < 1:
        raise ConfigError(f"The target rank must be at least 1, not {rank}.")
    if energy is not None and not 0 < energy <= 1:
        raise ConfigError(f"The energy to keep must be a fraction in (0, 1], not {energy}.",
                          hint="0.95 keeps 95% of each layer's squared Frobenius norm.")


def target_rank(svd: LowRankSVD, cap: int, energy: float | None) -> int:
    """The rank to keep: the energy threshold's rank (if any), never above ``cap``, at least 1."""
    wanted = svd.rank_for_energy(energy) if energy is not None else cap
    return max(1, min(wanted, cap, len(svd.s)))


def _truncated(name: str, svd: LowRankSVD, rank: int, like: LoraModule) -> LoraModule:
    up, down = svd.factors(rank)
    rank = up.shape[1]  # may be below the request when ΔW itself has lower rank
    if like.is_conv:
        up = up.reshape(up.shape[0], rank, 1, 1)
        down = down.reshape(rank, *like.down.shape[1:])
    return LoraModule(name, down.float(), up.float(), float(rank))


def _common_family(files: list[tuple]) -> str | None:
    families = {file.family for file, _ in files if file.family}
    if len(families) > 1:
        listing = ", ".join(f"{file.path.name} ({file.family or '?'})" for file, _ in files)
        raise LoraFileError(f"These LoRAs are for different base models: {listing}.",
                            hint="Only LoRAs of one model family can be merged.")
    return families.pop() if families else None


def _check_same_layer(name: str, parts: list[tuple[LoraModule, float]], files: list[tuple]) -> None:
    shapes = {(tuple(m.up.shape[:1]), tuple(m.down.shape[1:])) for m, _ in parts}
    if len(shapes) > 1:
        raise LoraFileError(f"The layer {name} has different shapes in the files being merged ({sorted(shapes)}).",
                            hint="The LoRAs were made for different base models.")


def output_metadata(source: dict[str, str], family: str | None, out: Path, ranks: list[int],
                    comment: str) -> dict[str, str]:
    """Header of a rewritten LoRA: the source's, minus its hash, with dim/alpha/title and a comment."""
    meta = {k: v for k, v in source.items() if k not in (HASH_KEY, PEFT_METADATA_KEY)}
    dim = str(ranks[0]) if len(ranks) == 1 else "Dynamic"
    meta.update({"ss_network_module": "networks.lora", "ss_network_dim": dim, "ss_network_alpha": dim,
                 "ss_output_name": out.stem, "modelspec.title": out.stem})
    meta.setdefault("modelspec.sai_model_spec", "1.0.1")
    if family:
        meta.setdefault("ss_base_model_version", FAMILY_VERSION[family])
        meta.setdefault("ss_v2", str(family == "sd2"))
        meta.setdefault("modelspec.architecture", FAMILY_ARCHITECTURE[family])
    previous = meta.get("ss_training_comment", "")
    meta["ss_training_comment"] = f"{previous}; {comment}" if previous else comment
    return meta


def _storable_dtype(dtype: str) -> str:
    return dtype if dtype in EXPORT_DTYPES else "fp32"  # fp64 sources are written as fp32


def _widest(dtypes: list[str]) -> str:
    kinds = {_storable_dtype(d) for d in dtypes}
    return kinds.pop() if len(kinds) == 1 else "fp32"  # fp16 and bf16 mixed: neither holds both


def _range(ranks: list[int]) -> str:
    return str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"
