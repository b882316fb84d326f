"""LoRA itself: where it goes, how it is attached, and its files in every style peers use.

``inject`` plans the target layers and attaches peft adapters (A random, B zero, scale α/r);
``adapters`` are the types (lora, dora, locon, loha, lokr) and kohya's per-block ranks and lrs;
``dropout`` adds kohya's neuron/rank/module dropouts to them; ``layers`` holds a file's layers in
memory (LoRA, LoCon, DoRA) and ``lycoris_keys`` LoHa/LoKr in LyCORIS's key format;
``names`` maps layers to kohya/A1111 names for SD1, SD2 and SDXL; ``reading`` reads any LoRA file
safely (kohya, PEFT files and folders, old diffusers); ``writing`` writes ours (kohya format) and
knows their exact size; ``metadata`` is the ``ss_*``/``modelspec.*`` header in kohya's shapes;
``sidecars`` are A1111/Forge's ``name.json`` and preview next to a file; ``peft_folder`` is the
``name-peft/`` copy in peft's own layout; ``sizing`` gives a preset's file size for a model from
its shapes alone. Imports ``trainer.core``,
``trainer.config`` and ``trainer.models``.
"""

from trainer.core.moved import lazy_names

__getattr__ = lazy_names(__name__, {name: "trainer.lora.inject" for name in (  # the 0.1 module trainer/lora.py
    "ADAPTER_NAME", "unet_target_modules", "text_encoder_target_modules", "LoraPlan", "plan_lora", "inject_lora",
    "lora_layers", "lora_parameters", "lora_state", "load_lora_state", "scaling_of", "module_in_out")}, moved=True)
