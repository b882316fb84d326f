"""The LoRA header's record of how the pictures were prepared: caption controls, masks, reg pictures.

kohya's key names where kohya has them (``ss_prior_loss_weight``, ``ss_masked_loss``,
``ss_caption_tag_dropout_rate``, ``ss_reg_dataset_dirs``); the caption prefix, suffix and
keep-tokens separator, which kohya keeps per dataset inside ``ss_datasets``, as flat keys.
"""

from __future__ import annotations

import json

from trainer.config.schema import DataConfig
from trainer.data.training_set import TrainingSet
from trainer.lora.metadata import OWN_PREFIX


def data_prep_metadata(cfg: DataConfig, training_set: TrainingSet) -> dict[str, str]:
    """``ss_*`` header values (all strings) for the data-preparation settings of a run."""
    meta = {
        "ss_caption_tag_dropout_rate": str(cfg.tag_dropout),
        f"{OWN_PREFIX}caption_prefix": cfg.caption_prefix,
        f"{OWN_PREFIX}caption_suffix": cfg.caption_suffix,
        f"{OWN_PREFIX}keep_tokens_separator": cfg.keep_tokens_separator,
        f"{OWN_PREFIX}masked_loss": str(cfg.masked_loss),
        "ss_prior_loss_weight": str(cfg.prior_loss_weight),
    }
    reg = training_set.reg
    if reg is not None:
        meta["ss_reg_dataset_dirs"] = json.dumps(reg.scan.folder_summary())
        meta[f"{OWN_PREFIX}class_prompt"] = cfg.class_prompt
    return meta
