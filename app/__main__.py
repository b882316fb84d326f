"""``python -m app``: start the local web app (same as ``lora-studio`` or ``lora-studio app``)."""

from app.cli import app_main

raise SystemExit(app_main())
