"""What a training run *is*: typed, frozen settings validated once (``schema``), and presets.

``schema`` holds the dataclasses (one per section: model, data, network, optim, train, output),
their TOML form; ``validation`` the single range-check pass; ``presets`` reads the built-in presets (the
top-level ``presets/`` folder, installed as ``trainer.config.builtin_presets``) and layers
defaults < preset < config file < overrides. Imports only ``trainer.core``.

The settings are importable from here too (``from trainer.config import StudioConfig``).
"""

from trainer.core.moved import lazy_names

_SCHEMA = "trainer.config.schema"
__getattr__ = lazy_names(__name__, {name: _SCHEMA for name in (
    "TargetSet", "Precision", "ExportDtype", "OptimizerName", "SchedulerName", "PredictionType", "LoraInit",
    "ModelConfig", "DataConfig", "NetworkConfig", "OptimConfig", "TrainConfig", "OutputConfig", "SECTIONS",
    "StudioConfig", "field_index", "nest_flat", "merge_dicts", "config_to_dict", "config_from_dict", "load_toml",
    "save_toml")} | {name: "trainer.config.validation" for name in ("validate", "check_resolution_multiple")})
