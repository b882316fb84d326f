"""LoRA Studio's built-in presets: TOML files of the run-config shape, read and copied by users.

Installed as ``trainer.config.builtin_presets`` (pyproject maps this folder there) and found
through ``importlib.resources`` by ``trainer.config.presets``; no Python lives here.
"""
