"""LoRA tools, one import for the CLI and the GUI: inspect, resize, merge, bake.

Each tool lives in its own module (``tools_inspect``, ``tools_resize``, ``tools_bake``; the
shared low-rank SVD in ``tools_svd``); this module only gathers their public entry points.
"""

from __future__ import annotations

from trainer.tools_bake import BakedLora, BakeReport, bake_loras
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
    "BakeReport", "BakedLora", "BlockStats", "LayerResize", "LayerStats", "LoraReport", "MergeReport",
    "ResizeReport", "bake_loras", "inspect_lora", "merge_loras", "plot_report", "resize_lora",
]
