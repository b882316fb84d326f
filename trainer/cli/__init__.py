"""The engine's ``lora-studio`` commands: thin clients of the API, like the GUI.

``main`` parses and dispatches; ``train`` holds train/presets, ``tools`` generate/inspect/resize/
merge/bake/extract, ``grid`` the epoch grid, ``prep`` caption/tags/reg-images, ``console`` what they share (exit codes, the parser, quiet libraries).
``python -m trainer.cli train ...`` runs them without the app (e.g. under ``accelerate launch``);
the console script in ``app.cli`` adds the ``app`` command. May import all of ``trainer``, never ``app``.
"""

from trainer.core.moved import lazy_names

__getattr__ = lazy_names(__name__, {  # the 0.1 module trainer/cli.py
    "EXIT_USER_ERROR": "trainer.cli.console", "EXIT_INTERRUPTED": "trainer.cli.console",
    "StudioArgumentParser": "trainer.cli.console", "format_size": "trainer.cli.console",
    "quiet_libraries": "trainer.cli.console", "build_parser": "trainer.cli.main",
    "add_config_flags": "trainer.cli.train", "config_overrides": "trainer.cli.train"}, moved=True)
