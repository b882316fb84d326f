"""The PEFT copy of a LoRA: a folder in peft's own ``save_pretrained`` layout, no UI mistakes it for a LoRA.

``--export-peft`` writes, next to ``name.safetensors``::

    name-peft/
        unet/adapter_config.json           peft's LoraConfig (r, lora_alpha, target_modules, use_rslora, ...)
        unet/adapter_model.safetensors     base_model.model.<module path>.lora_A/lora_B.weight
        text_encoder/..., text_encoder_2/...   the same for each trained text encoder
        pytorch_lora_weights.safetensors   the same adapters as diffusers' save_lora_weights writes them
        README.md                          how to load it

``PeftModel.from_pretrained(pipe.unet, "name-peft/unet")`` loads a component folder and
``pipe.load_lora_weights("name-peft")`` the diffusers file. None of these files has ``ss_*``
metadata, and their keys are not kohya's, so a scan of ``*.safetensors`` headers for ``ss_`` keys
(what LoRA browsers key on) finds only the kohya file. Module paths are the trained models' own
(transformers >= 5.6 has no ``text_model.`` level inside ``CLIPTextModel``), so the folder loads
into the same model classes it was trained on.

The folder is built under a temporary name and swapped in whole: a reader sees the old folder or
the complete new one.
"""

from __future__ import annotations

import collections
import json
import math
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path

import safetensors.torch
import torch
from peft import LoraConfig

from trainer.core.atomic import is_disk_full, write_error
from trainer.lora.names import model_module_path, parse_kohya_module_name
from trainer.lora.reading import (
    DIFFUSERS_WEIGHTS,
    PEFT_CONFIG,
    PEFT_WEIGHTS,
    LoraModule,
)
from trainer.lora.writing import kohya_state_dict, save_peft_lora

PEFT_PREFIX = "base_model.model."  # what PeftModel.state_dict() puts before every module path


def peft_folder_for(output: str | Path) -> Path:
    """``out/name.safetensors`` -> ``out/name-peft``."""
    output = Path(output)
    return output.with_name(f"{output.stem}-peft")


def save_peft_folder(modules: Iterable[LoraModule], folder: str | Path, *, models: Mapping[str, torch.nn.Module],
                     dtype: str = "fp16", rslora: bool = False) -> Path:
    """Write ``folder`` (see the module doc) for the kohya ``modules`` of the models in ``models``.

    ``models`` maps each component ("unet", "text_encoder", "text_encoder_2") to the model the
    adapters were trained on: its module paths go into the keys and its class into
    ``auto_mapping``, as ``PeftModel.save_pretrained`` writes them. With ``rslora`` the config
    says ``use_rslora`` with the trained alpha (alpha/sqrt(r) = the file's alpha/r).
    """
    folder = Path(folder)
    modules = list(modules)
    casted = kohya_state_dict(modules, dtype)  # the kohya export's checks and casts
    by_component: dict[str, list[tuple[str, LoraModule]]] = collections.defaultdict(list)
    for module in modules:
        component, path = parse_kohya_module_name(module.name)
        if component not in models:
            raise ValueError(f"{module.name}: no {component} model given to take module paths from")
        by_component[component].append((model_module_path(models[component], component, path), module))
    staging = folder.with_name(f".{folder.name}.partial")
    try:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        for component, entries in sorted(by_component.items()):
            _write_adapter(staging / component, entries, casted, models[component], rslora)
        save_peft_lora(modules, staging / DIFFUSERS_WEIGHTS, dtype=dtype)  # no ss_* metadata: not a LoRA to UIs
        (staging / "README.md").write_text(_readme(folder.name, sorted(by_component)), encoding="utf-8")
        _swap_in(staging, folder)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, OSError) or is_disk_full(exc):  # safetensors reports ENOSPC as its own error
            raise write_error(folder, exc) from None
        raise
    return folder


def adapter_config(entries: list[tuple[str, LoraModule]], rslora: bool = False) -> LoraConfig:
    """peft's LoraConfig for (module path, module) pairs: the commonest rank/alpha, patterns for the rest."""
    def peft_alpha(module: LoraModule) -> float:
        # the file's alpha gives scale alpha/r; rsLoRA's config alpha gives alpha/sqrt(r)
        alpha = module.alpha / math.sqrt(module.rank) if rslora else module.alpha
        return round(alpha, 6) if abs(alpha - round(alpha, 6)) < 1e-9 * max(1.0, alpha) else alpha

    ranks = {path: module.rank for path, module in entries}
    alphas = {path: peft_alpha(module) for path, module in entries}
    rank = collections.Counter(ranks.values()).most_common(1)[0][0]
    alpha = collections.Counter(alphas.values()).most_common(1)[0][0]
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=sorted(ranks),
        rank_pattern={path: r for path, r in ranks.items() if r != rank},
        alpha_pattern={path: a for path, a in alphas.items() if a != alpha},
        use_rslora=rslora,
        lora_dropout=0.0,
        bias="none",
        inference_mode=True,  # as save_pretrained writes it
    )


# --- helpers -------------------------------------------------------------------------------------


def _write_adapter(where: Path, entries: list[tuple[str, LoraModule]], casted: dict[str, torch.Tensor],
                   model: torch.nn.Module, rslora: bool) -> None:
    where.mkdir()
    tensors = {}
    for path, module in sorted(entries, key=lambda e: e[0]):
        tensors[f"{PEFT_PREFIX}{path}.lora_A.weight"] = casted[f"{module.name}.lora_down.weight"]
        tensors[f"{PEFT_PREFIX}{path}.lora_B.weight"] = casted[f"{module.name}.lora_up.weight"]
    safetensors.torch.save_file(tensors, str(where / PEFT_WEIGHTS), metadata={"format": "pt"})
    config = adapter_config(entries, rslora).to_dict()
    config = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}  # sets: sorted, reproducible
    config["auto_mapping"] = {"base_model_class": type(model).__name__, "parent_library": type(model).__module__}
    (where / PEFT_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
    _fsync_tree(where)


def _fsync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        if path.is_file():
            with open(path, "rb+") as fh:
                os.fsync(fh.fileno())


def _swap_in(staging: Path, folder: Path) -> None:
    _fsync_tree(staging)
    old = folder.with_name(f".{folder.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        os.replace(folder, old)
    os.replace(staging, folder)
    shutil.rmtree(old, ignore_errors=True)


def _readme(name: str, components: list[str]) -> str:
    loads = "\n".join(f'PeftModel.from_pretrained(pipe.{c}, "{name}/{c}")  # adds the adapter to pipe.{c} in place'
                      for c in components)
    return f"""# {name}: the PEFT copy of a LoRA Studio LoRA

For Python code, not for A1111, Forge or ComfyUI (use the `.safetensors` file next to this folder there).

With diffusers:

```python
pipe.load_lora_weights("{name}")  # reads {DIFFUSERS_WEIGHTS}
```

With peft, one component at a time:

```python
from peft import PeftModel
{loads}
```
"""
