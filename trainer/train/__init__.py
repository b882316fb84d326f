"""A training run: ``trainer.train.loop.train(config, commands)`` yields typed progress events.

``session`` sets a run up (model, data, LoRA, optimiser, caches, device placement); ``loop`` is the
loop itself; ``losses`` the objective, ``loss_weighting`` its per-timestep weights, ``noise`` the noise
and timesteps; ``optim`` optimisers, parameter groups and schedules; ``ema`` the weights' average; ``checkpoints`` resumable,
pickle-free state; ``fingerprint`` what a checkpoint may be resumed with; ``transfers`` host/device traffic without syncs; ``sampling`` the sample images;
``export`` the LoRA file at the end; ``planned_size`` that file's exact size before the run; ``epoch_files`` the loadable files during a run,
``validation`` the held-out loss at fixed timesteps and noise, ``metrics`` metrics.jsonl (and
TensorBoard) and the best-epoch hint, ``parity`` the written file re-rendered, ``run_outputs`` what
the loop calls for all of these; ``events`` the typed interface to clients; ``estimate`` and
``step_profile`` memory and time before anything is loaded. Imports every package above it
(``core``, ``config``, ``data``, ``models``, ``lora``, ``generate``), never ``tools`` or ``cli``.
"""
