"""LoRA tools, one import for the CLI and the GUI: inspect, resize, merge, bake, extract.

Each tool lives in its own module (``tools_inspect``, ``tools_resize``, ``tools_bake``, ``tools_extract``; the
shared low-rank SVD in ``tools_svd``); this module only gathers their public entry points.
"""

from __future__ import annotations

from trainer.tools_bake import BakedLora, BakeReport, bake_loras
from trainer.tools_extract import ExtractReport, extract_lora
from trainer.tools_inspect import (
    BlockStats,
    LayerStats,
    LoraReport,
    inspect_lora,
    plot_report,
)
from trainer.tools_resize import (
    LayerResize,
    MergeReport,
    ResizeReport,
    merge_loras,
    resize_lora,
)

__all__ = [
    "BakeReport", "BakedLora", "BlockStats", "ExtractReport", "LayerResize", "LayerStats", "LoraReport", "MergeReport",
    "ResizeReport", "bake_loras", "extract_lora", "inspect_lora", "merge_loras", "plot_report", "resize_lora",
]
