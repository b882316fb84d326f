"""What every part of the engine uses, and nothing of LoRA or Stable Diffusion.

Owns the one exception family users see (``errors``), crash-safe file writes (``atomic``),
content hashes (``hashing``), the checked reading of safetensors headers (``safetensors_header``),
the device and precision checks made before any model loads (``devices``) and the 0.1 module
paths kept for one release (``moved``). Imports nothing else from ``trainer``.
"""
