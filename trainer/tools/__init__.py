"""What artists do with LoRA files besides generating: inspect, resize, merge, bake, extract.

``inspect`` reports a file's base, rank/alpha and per-layer strength and spectrum; ``resize`` and
merging shrink or combine files by SVD (``svd``); ``bake`` adds LoRAs into a checkpoint; ``extract``
makes a LoRA from a fine-tune's difference; ``fit`` checks a file against a base model's (or its
family's) layer widths before any of them. Imports ``core``, ``config``, ``models``, ``lora`` and
``generate``, never ``train`` or ``cli``.

The tools are importable from here (``from trainer.tools import resize_lora``).
"""

from trainer.core.moved import lazy_names

__getattr__ = lazy_names(__name__, {
    **{name: "trainer.tools.bake" for name in ("BakedLora", "BakeReport", "bake_loras")},
    **{name: "trainer.tools.extract" for name in ("ExtractReport", "extract_lora")},
    **{name: "trainer.tools.inspect" for name in ("BlockStats", "LayerStats", "LoraReport", "inspect_lora", "plot_report")},
    **{name: "trainer.tools.resize" for name in ("LayerResize", "MergeReport", "ResizeReport", "merge_loras",
                                                  "resize_lora")},
})
