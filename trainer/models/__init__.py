"""Base models: which family a file holds, and loading it frozen from any source.

``family`` reads SD1/SD2/SDXL and the prediction type from configs or a safetensors header
without loading weights (and ships the bundled diffusers configs in ``configs/``); ``loading``
builds a frozen ``BaseModel`` from a diffusers folder, a single-file checkpoint or a hub id;
``single_file`` writes diffusers components back as one A1111/ComfyUI checkpoint; ``text`` tokenises
and encodes prompts; ``demo`` builds the tiny random model the demo and the tests use; ``identity`` hashes a base
model's weights (cached per file version) so a resume on replaced weights is caught. Imports
``trainer.core`` and ``trainer.config`` only.
"""

from trainer.core.moved import lazy_names

__getattr__ = lazy_names(__name__, {  # the 0.1 module trainer/models.py
    "TOKENIZER_DIR": "trainer.models.family", "PICKLE_SUFFIXES": "trainer.models.loading",
    "HUB_ID": "trainer.models.loading", "HUB_PATTERNS": "trainer.models.loading", "BaseModel": "trainer.models.loading",
    "load_base_model": "trainer.models.loading", "make_inference_scheduler": "trainer.generate.pipeline",
    "inference_pipeline": "trainer.generate.pipeline"}, moved=True)
