"""``python -m trainer.cli train ...``: the engine's commands without the app (used under ``accelerate launch``)."""

from trainer.cli.main import main

raise SystemExit(main(prog="python -m trainer.cli"))
