"""A training run: ``trainer.train.loop.train(config, commands)`` yields typed progress events.

``session`` sets a run up (model, data, LoRA, optimiser, caches, device placement); ``loop`` is the
loop itself; ``losses`` the objective; ``optim`` optimisers and schedules; ``checkpoints`` resumable,
pickle-free state; ``transfers`` host/device traffic without syncs; ``sampling`` the sample images;
``export`` the LoRA file at the end; ``events`` the typed interface to clients; ``estimate`` and
``step_profile`` memory and time before anything is loaded. Imports every package above it
(``core``, ``config``, ``data``, ``models``, ``lora``, ``generate``), never ``tools`` or ``cli``.
"""
