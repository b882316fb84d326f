"""What a LoRA file is and where its strength sits: family, rank/α, metadata, per-layer spectra.

For every layer the update ΔW = (α/r)·B·A is measured without forming it: its Frobenius norm,
its singular values (``tools_svd.lowrank_svd``) and its effective rank, the number of singular
values that hold 99% of ‖ΔW‖²_F. A LoRA trained at rank 64 whose layers have effective rank 6
can be resized to 8 with almost nothing lost; the per-block summary (text encoder, UNet down /
mid / up) shows where it acts, which is what LoRA Block Weight presets are chosen by.
"""

from __future__ import annotations

import collections
import json
from dataclasses import dataclass, field
from pathlib import Path

from trainer.core.atomic import atomic_path
from trainer.core.output_paths import check_output_file
from trainer.lora.names import parse_kohya_module_name
from trainer.lora.reading import LoraFile, read_lora_file
from trainer.models.family import FAMILY_LABELS
from trainer.tools.fit import BaseFit, check_fits
from trainer.tools.svd import lowrank_svd

EFFECTIVE_RANK_ENERGY = 0.99
BLOCKS = ("te", "te2", "down", "mid", "up", "other")
_BASE_LABELS = {**FAMILY_LABELS, None: "an unknown base"}
_TYPE_LABELS = {"lora": "LoRA", "locon": "LoCon (LoRA + 3x3 convs)", "dora": "DoRA", "loha": "LoHa", "lokr": "LoKr"}
_BLOCK_COLOURS = {"te": "#8c6bb1", "te2": "#c994c7", "down": "#2b8cbe", "mid": "#31a354", "up": "#e6550d",
                  "other": "#969696"}


@dataclass(frozen=True)
class LayerStats:
    """One layer's update ΔW = scale·B·A."""

    name: str  # kohya name
    block: str  # te, te2, down, mid, up, other
    rank: int
    alpha: float
    shape: tuple[int, ...]  # the base layer's weight shape (out, in[, kh, kw])
    norm: float  # ‖ΔW‖_F
    singular_values: tuple[float, ...]  # of ΔW, descending
    effective_rank: int  # singular values holding 99% of ‖ΔW‖²_F
    parameters: int = 0  # stored numbers of the layer (every tensor of its type, alpha aside)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank if self.rank else 1.0  # LoKr without a low-rank factor: scale 1


@dataclass(frozen=True)
class BlockStats:
    block: str
    layers: int
    norm: float  # √Σ‖ΔW‖²_F over the block's layers
    share: float  # the block's fraction of the file's total ‖ΔW‖²_F


@dataclass(frozen=True)
class LoraReport:
    path: Path
    family: str | None
    style: str  # kohya, peft, diffusers-old
    dtype: str
    size_bytes: int
    metadata: dict[str, str]
    trigger_phrase: str
    top_tags: tuple[tuple[str, int], ...]  # from ss_tag_frequency, most frequent first
    layers: tuple[LayerStats, ...]
    blocks: tuple[BlockStats, ...] = field(default=())
    fit: BaseFit | None = None  # what the layers were checked against (None: nothing to check against)
    network_type: str = "lora"  # lora, locon, dora, loha, lokr

    @property
    def parameters(self) -> int:
        return sum(s.parameters or s.rank * (s.shape[0] + _fan_in(s.shape)) for s in self.layers)

    def text(self, per_layer: bool = False) -> str:
        """A plain-text summary for the terminal (``per_layer`` adds one line per layer)."""
        ranks = collections.Counter(s.rank for s in self.layers)
        alphas = collections.Counter(s.alpha for s in self.layers)
        lines = [
            (f"{self.path.name}: {_TYPE_LABELS.get(self.network_type, self.network_type)} for {_BASE_LABELS.get(self.family, self.family)} ({self.style} format, "
            f"{self.dtype}, {_size(self.size_bytes)}, {self.parameters:,} parameters)"),
            f"Layers: {len(self.layers)} ("
            + ", ".join(f"{b.block} {b.layers}" for b in self.blocks if b.layers) + ")",
            "Rank: " + _counts(ranks) + "; alpha: " + _counts(alphas)
            + (f" (scale {self.layers[0].scale:g})" if len(ranks) == 1 and len(alphas) == 1 else ""),
        ]
        lines.append(self.fit.text() if self.fit else
                     "Layer widths not checked: the file's shapes name no family and no base model was given.")
        if self.trigger_phrase:
            lines.append(f"Trigger phrase: {self.trigger_phrase}")
        if self.top_tags:
            lines.append("Top tags: " + ", ".join(f"{tag} ({count})" for tag, count in self.top_tags))
        trained = _training_summary(self.metadata)
        if trained:
            lines.append(trained)
        effective = sorted(s.effective_rank for s in self.layers)
        lines.append(f"Effective rank (99% energy): median {effective[len(effective) // 2]}, max {effective[-1]} "
                     f"of stored rank {max(ranks)}")
        lines.append("Strength by block (‖ΔW‖_F, share of energy):")
        for b in self.blocks:
            if b.layers:
                lines.append(f"  {b.block:<5} {b.layers:>4} layers  {b.norm:10.4g}  {b.share:6.1%}")
        if per_layer:
            lines.append("Per layer (rank, alpha, ‖ΔW‖_F, effective rank, leading singular values):")
            for s in self.layers:
                top = " ".join(f"{v:.3g}" for v in s.singular_values[:4])
                lines.append(f"  {s.name}  r{s.rank} a{s.alpha:g}  {s.norm:.4g}  eff {s.effective_rank}  [{top}]")
        return "\n".join(lines)


def inspect_lora(path: str | Path, plot: str | Path | None = None, *, base: str | None = None,
                 base_config: str = "") -> LoraReport:
    """Read ``path`` (any supported LoRA file) and measure every layer; optionally write a PNG plot.

    With ``base`` the file must fit that model (family and every layer's width, ``tools.fit``).
    """
    if plot is not None:
        plot = check_output_file(plot, suffix=".png", label="The plot", inputs=[("LoRA file", path)])
    file = read_lora_file(path)
    fit = check_fits(file, base, base_config)
    layers = tuple(_layer_stats(name, module) for name, module in sorted(file.modules.items(), key=_model_order))
    report = LoraReport(
        path=file.path, family=file.family, style=file.style, dtype=file.dtype, size_bytes=file.path.stat().st_size,
        metadata=dict(file.metadata), trigger_phrase=trigger_phrase(file), top_tags=top_tags(file.metadata),
        layers=layers, blocks=block_summary(layers), fit=fit, network_type=file.network_type)
    if plot is not None:
        plot_report(report, plot)
    return report


def block_of(name: str) -> str:
    """te / te2 / down / mid / up / other for a kohya layer name."""
    try:
        component, path = parse_kohya_module_name(name)
    except ValueError:
        component, path = ("unet" if name.startswith("lora_unet_") else "text_encoder"), name
    if component != "unet":
        return "te2" if component == "text_encoder_2" else "te"
    for prefixes, block in ((("down_blocks", "lora_unet_input_blocks"), "down"),
                            (("mid_block", "lora_unet_middle_block"), "mid"),
                            (("up_blocks", "lora_unet_output_blocks"), "up")):
        if path.startswith(prefixes):
            return block
    return "other"


def block_summary(layers: tuple[LayerStats, ...]) -> tuple[BlockStats, ...]:
    total = sum(s.norm ** 2 for s in layers) or 1.0
    summary = []
    for block in BLOCKS:
        energy = sum(s.norm ** 2 for s in layers if s.block == block)
        count = sum(1 for s in layers if s.block == block)
        summary.append(BlockStats(block, count, energy ** 0.5, energy / total))
    return tuple(summary)


def trigger_phrase(file: LoraFile) -> str:
    """The header's trigger phrase, else A1111's sidecar ``<name>.json`` "activation text"."""
    phrase = file.metadata.get("modelspec.trigger_phrase", "").strip()
    sidecar = file.path.with_suffix(".json")
    if not phrase and sidecar.is_file():
        try:
            phrase = str(json.loads(sidecar.read_text(encoding="utf-8")).get("activation text", "")).strip()
        except (OSError, ValueError, AttributeError):
            phrase = ""
    return phrase


def top_tags(metadata: dict[str, str], count: int = 8) -> tuple[tuple[str, int], ...]:
    """Most frequent caption tags over all dataset folders (kohya's ``ss_tag_frequency``)."""
    try:
        folders = json.loads(metadata.get("ss_tag_frequency", "") or "{}")
    except json.JSONDecodeError:
        return ()
    totals: collections.Counter[str] = collections.Counter()
    if isinstance(folders, dict):
        for tags in folders.values():
            if isinstance(tags, dict):
                totals.update({str(t).strip(): int(n) for t, n in tags.items() if isinstance(n, (int, float))})
    return tuple(totals.most_common(count))


def plot_report(report: LoraReport, path: str | Path) -> Path:
    """A PNG with per-layer strength, every layer's singular-value spectrum and the block summary."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(12, 9), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)  # a canvas of our own: no pyplot, no global figure state
    norms, spectra, blocks = figure.subplots(3, 1, height_ratios=(2, 2, 1))
    colours = [_BLOCK_COLOURS[s.block] for s in report.layers]
    norms.bar(range(len(report.layers)), [s.norm for s in report.layers], color=colours, width=1.0)
    norms.set(title=f"{report.path.name}: ‖ΔW‖_F per layer (model order)", xlabel="layer", ylabel="‖ΔW‖_F")
    for s in report.layers:
        if s.singular_values and s.singular_values[0] > 0:
            values = [v / s.singular_values[0] for v in s.singular_values]
            spectra.plot(range(1, len(values) + 1), values, color=_BLOCK_COLOURS[s.block], alpha=0.35, linewidth=1)
    spectra.set(title="Singular values of each ΔW (relative to the largest)", xlabel="index", ylabel="σᵢ / σ₁",
                yscale="log")
    spectra.xaxis.set_major_locator(MaxNLocator(integer=True))
    shown = [b for b in report.blocks if b.layers]
    blocks.bar([b.block for b in shown], [b.share for b in shown], color=[_BLOCK_COLOURS[b.block] for b in shown])
    blocks.set(title="Share of ‖ΔW‖²_F by block", ylabel="share")
    path = Path(path)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    return path


# --- helpers -------------------------------------------------------------------------------------


def _layer_stats(name: str, module) -> LayerStats:
    if not hasattr(module, "down"):  # LoHa/LoKr: the spectrum of their exact low-rank form
        down, up = module.factors()
        svd = lowrank_svd(up, down, 1.0)
        return LayerStats(name=name, block=block_of(name), rank=module.rank, alpha=float(module.alpha),
                          shape=module.out_in, norm=svd.energy ** 0.5, singular_values=tuple(float(v) for v in svd.s),
                          effective_rank=svd.rank_for_energy(EFFECTIVE_RANK_ENERGY),
                          parameters=sum(t.numel() for t in module.tensors().values()))
    svd = lowrank_svd(module.up, module.down, module.alpha / module.rank)  # DoRA: its B·A part
    shape = (int(module.up.shape[0]), *map(int, module.down.shape[1:]))
    return LayerStats(name=name, block=block_of(name), rank=module.rank, alpha=float(module.alpha), shape=shape,
                      norm=svd.energy ** 0.5, singular_values=tuple(float(v) for v in svd.s),
                      effective_rank=svd.rank_for_energy(EFFECTIVE_RANK_ENERGY),
                      parameters=sum(t.numel() for t in module.tensors().values()))  # DoRA: + dora_scale


def _model_order(item) -> tuple:
    """TE first, then UNet down, mid, up; numbers compared as numbers (block 10 after block 9)."""
    name = item[0]
    block = block_of(name)
    parts = tuple(int(p) if p.isdigit() else p for p in name.split("_"))
    return BLOCKS.index(block), tuple((0, p) if isinstance(p, int) else (1, p) for p in parts)


def _fan_in(shape: tuple[int, ...]) -> int:
    fan_in = 1
    for dim in shape[1:]:
        fan_in *= dim
    return fan_in


def _counts(counter: collections.Counter) -> str:
    if len(counter) == 1:
        return f"{next(iter(counter)):g}"
    return ", ".join(f"{value:g} ×{n}" for value, n in sorted(counter.items()))


def _size(size: int) -> str:
    return f"{size / 1e6:.1f} MB" if size >= 1e5 else f"{size / 1e3:.1f} kB"


def _training_summary(metadata: dict[str, str]) -> str:
    def given(key: str) -> str:
        value = metadata.get(key, "").strip()
        return "" if value in ("", "0", "0.0", "None") else value

    parts = [text.format(given(key)) for key, text in (
        ("ss_steps", "{} steps"), ("ss_epoch", "epoch {}"), ("ss_learning_rate", "lr {}"),
        ("ss_num_train_images", "{} images"), ("ss_sd_model_name", "base {}")) if given(key)]
    return "Trained: " + ", ".join(parts) if parts else ""
