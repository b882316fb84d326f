"""The dataset: from a folder of pictures and captions to the batches a run trains on.

``scan`` walks the folder once (images, caption sidecars, kohya ``N_name`` repeats, problems as
rows, never crashes); ``images`` opens a picture as the user saw it; ``captions`` reads and
shapes caption text; ``buckets`` picks each picture's aspect bucket; ``lint`` is the report shown
before training; ``training_set`` is the deterministic, resumable sample order; ``holdout`` the validation
pictures (a seeded split, or their own folder) that never train; ``caches`` keeps
latents and text embeddings out of the steady-state step. ``masks`` (loss masks), ``regularization``
(class pictures and kohya's balancing), ``tag_stats`` (the tag table), ``caption_undo`` (every
caption change undoable) and ``captioning`` (taggers and captioners writing captions) prepare a
dataset. Imports ``trainer.core`` and ``trainer.config`` only (never a diffusion model: encoders
are passed in; the captioning models load through onnxruntime/transformers on demand).
"""
