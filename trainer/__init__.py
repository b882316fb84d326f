"""LoRA Studio's engine: a plain Python API for training and using Stable Diffusion LoRAs.

Sub-packages, each importing only those listed before it (``tests/test_layout.py`` checks it):

- ``core``      the exception family, crash-safe writes, file hashes, safetensors headers
- ``config``    what a run *is*: typed, validated settings and presets
- ``data``      the dataset: scan, images, captions, buckets, the lint report, latent/text caches
- ``models``    base models: families, loading from any source, single-file layout, demo model
- ``lora``      LoRA itself: injection, kohya names, reading any file, writing ours, sizes
- ``generate``  txt2img with any number of LoRA files, samplers, A1111 infotext
- ``train``     a training run: session, loop, losses, optimisers, checkpoints, estimate
- ``tools``     inspect, resize, merge, bake, extract
- ``cli``       the ``lora-studio`` commands of the engine (the app adds its own on top)

The engine never imports the GUI (``app``) or gradio. The module paths of 0.1 (``trainer.loop``,
``trainer.formats``, ...) still import, with a deprecation warning (``trainer.core.moved``).
"""

from trainer.core.moved import install_moved_module_finder

install_moved_module_finder()
