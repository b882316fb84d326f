"""txt2img with any number of LoRA files mixed in: W = W0 + Σ wᵢ·(αᵢ/rᵢ)·BᵢAᵢ.

``requests`` is what a user asks for (LoRA specs with weights, block weights, the request) and
what comes back; ``matching`` fits a file's layers to a model's; ``generator`` holds a base model
and its pipeline while files come and go (fused or packed, ``packed``); ``pipeline`` and
``schedulers`` build the diffusers pipeline with A1111-named samplers (the training samples use
them too); ``infotext`` writes and parses A1111's PNG parameters; ``prompt_file`` reads kohya's
sample-prompt lines; ``grid`` renders an X/Y grid of LoRA files × prompts × weights. Imports ``trainer.core``,
``trainer.config``, ``trainer.models`` and ``trainer.lora``.

The public API is importable from here (``from trainer.generate import Generator``).
"""

from trainer.core.moved import lazy_names

_REQUESTS, _MATCHING, _GENERATOR = "trainer.generate.requests", "trainer.generate.matching", "trainer.generate.generator"
__getattr__ = lazy_names(__name__, {
    **{name: _REQUESTS for name in ("LBW_PRESETS", "BlockWeights", "parse_block_weights", "LoraSpec", "parse_lora_arg",
                                     "GenerationRequest", "GeneratedImage", "GenerationProgress", "save_images")},
    **{name: _MATCHING for name in ("LayerRef", "LoraMatch", "layer_index", "match_lora", "model_components",
                                     "lora_factors", "transformer_blocks", "lbw_vector", "block_multipliers")},
    **{name: _GENERATOR for name in ("ADAPTER_PREFIX", "LoraLoadReport", "Generator", "lora_short_hash")},
})
