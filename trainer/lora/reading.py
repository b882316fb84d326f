"""Reading any LoRA file safely: kohya, diffusers/PEFT and old diffusers key styles.

Only safetensors is read. Pickles (``.ckpt/.pt/.bin/.pth``) can run arbitrary code when loaded,
so they are refused by name and by content. The header is checked before anything is allocated
(length, JSON, dtypes, offsets), so a truncated download or a renamed file gets a message that
says so instead of a crash deep inside a loader.

Every style is normalised to ``LoraFile.modules``: kohya name -> ``LoraModule`` with the kohya
meaning of alpha (scale = alpha / rank), whatever convention the file used. The base family is
read from the shapes (cross-attention key width 768 = SD1, 1024 = SD2, 2048 = SDXL; a second
text encoder = SDXL), then names and metadata, so a LoRA for another family is refused with a
clear message instead of loading partially.
"""

from __future__ import annotations

import collections
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.core.errors import LoraFileError
from trainer.core.safetensors_header import (
    PICKLE_SUFFIXES,
    load_safetensors,
    read_safetensors_header,
    refuse_pickle,
)
from trainer.lora.layers import LoraFile, LoraModule
from trainer.lora.lycoris_keys import split_lycoris
from trainer.lora.names import (
    COMPONENTS,
    canonical_te_path,
    kohya_module_name,
    parse_kohya_module_name,
)
from trainer.models.family import FAMILY_LABELS

PEFT_CONFIG = "adapter_config.json"  # peft's save_pretrained layout: one folder per adapter
PEFT_WEIGHTS = "adapter_model.safetensors"
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' save_lora_weights file name
_FLOAT_DTYPES = {"F16": "fp16", "BF16": "bf16", "F32": "fp32", "F64": "fp64"}
_TORCH_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}
_CROSS_ATTN_WIDTH = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
_TE_WIDTH = {1024: "sd2", 1280: "sdxl"}  # 768 is SD1 *or* SDXL's first encoder

_UNSUPPORTED = [  # key pattern -> network type
    (re.compile(r"\.hada_t[12]$"), "LyCORIS LoHa with Tucker factors"),
    (re.compile(r"\.lokr_t2$"), "LyCORIS LoKr with Tucker factors"),
    (re.compile(r"\.(oft_blocks|oft_diag|oft_[a-z_]+|rescale)$"), "OFT/BOFT"),
    (re.compile(r"\.lora_mid\.weight$"), "LyCORIS LoCon with Tucker decomposition"),
    (re.compile(r"lora_magnitude_vector(\.[^.]+)?(\.weight)?$"), "PEFT-format DoRA"),
    (re.compile(r"\.(diff|diff_b|w_norm|b_norm|on_input)$"), "LyCORIS full/norm"),
    (re.compile(r"\.lora_(B|up)(\.[^.]+)?\.bias$"), "LoRA with bias"),
]
_KOHYA_KEY = re.compile(r"^(lora_(?:unet|te|te1|te2)_[^.]+)\.(lora_down\.weight|lora_up\.weight|alpha)$")
_PREFIXES = r"(?:(unet|text_encoder|text_encoder_2|base_model\.model)\.)?"
_PEFT_KEY = re.compile(rf"^{_PREFIXES}(.+?)\.lora_([AB])(?:\.[A-Za-z0-9_\-]+)?\.weight$")
_PEFT_ALPHA = re.compile(rf"^{_PREFIXES}(.+)\.alpha$")
_OLD_PROCESSOR_KEY = re.compile(rf"^{_PREFIXES}(.+?)\.(?:processor\.)?(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_OLD_LAYER_KEY = re.compile(rf"^{_PREFIXES}(.+?)\.(?:lora_linear_layer|lora)\.(down|up)\.weight$")
_UNET_ROOTS = {"down_blocks", "up_blocks", "mid_block", "conv_in", "conv_out", "time_embedding", "add_embedding",
               "conv_norm_out", "encoder_hid_proj", "class_embedding"}
_TE_ROOTS = {"encoder", "embeddings", "final_layer_norm", "text_projection"}
_OLD_TE_PROJ = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
_OLD_UNET_PROJ = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}


@dataclass
class _RawModule:
    """One layer as found in the file, before names are normalised."""

    component: str
    path: str | None  # diffusers/canonical path; None for kohya names we cannot map
    label: str  # the file's own name for the layer, for messages
    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    alpha: float | None = None
    kohya_stem: str | None = None


# --- public API ----------------------------------------------------------------------------------


def read_lora_file(path: str | Path) -> LoraFile:
    """Read and validate a LoRA ``.safetensors`` file of any supported key style.

    A PEFT folder (``name-peft/``, one ``adapter_config.json`` + ``adapter_model.safetensors`` per
    component) or one of its ``adapter_model.safetensors`` files is read with its config's alpha.
    """
    path = Path(path)
    if path.is_dir() or (path.name == PEFT_WEIGHTS and (path.parent / PEFT_CONFIG).is_file()):
        return _read_peft_adapters(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        refuse_pickle(path, LoraFileError)
    if not path.is_file():
        raise LoraFileError(f"LoRA file not found: {path}.", hint="Check the path.")
    tensors, metadata = _load_checked(path)
    if "lora_adapter_metadata" not in metadata and any(key.startswith("base_model.model.") for key in tensors):
        raise LoraFileError(f"{path.name} holds a PEFT adapter's weights without its adapter_config.json, "
                            "which says how strong it is.",
                            hint="Load the whole PEFT folder (e.g. name-peft/), or the .safetensors LoRA made with it.")
    return _lora_file(path, tensors, metadata)


def detect_lora_family(file: LoraFile) -> str | None:
    """"sd1" | "sd2" | "sdxl" from the modules' shapes, names and metadata; None if undecidable."""
    entries = []
    for name, module in file.modules.items():
        try:
            component, module_path = parse_kohya_module_name(name)
        except ValueError:
            component, module_path = ("text_encoder_2" if name.startswith("lora_te2_") else "unet"), None
        entries.append((component, module_path, tuple(module.down.shape) if hasattr(module, "down")
                        else (module.rank, module.out_in[1])))
    sgm = any(re.search(r"_(input_blocks|output_blocks|middle_block)_", name) for name in file.modules)
    return _family_from(entries, file.metadata, sgm)


def check_lora_fits(file: LoraFile, family: str) -> None:
    """Raise LoraFileError when ``file`` was made for another model family than ``family``."""
    if file.family is None or file.family == family:
        return
    made_for, loaded = FAMILY_LABELS[file.family], FAMILY_LABELS.get(family, family)
    raise LoraFileError(f"The LoRA {file.path.name} was made for {made_for} but the loaded model is {loaded}.",
                        hint=f"Pick an {made_for} base model or another LoRA.")


def _load_checked(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    header, _ = read_safetensors_header(path, LoraFileError)
    _check_weight_dtypes(path, header)
    return load_safetensors(path, LoraFileError)


def _lora_file(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> LoraFile:
    lycoris, tensors = split_lycoris(path.name, tensors)
    dora = {k.removesuffix(".dora_scale"): v for k, v in tensors.items() if k.endswith(".dora_scale")}
    tensors = {k: v for k, v in tensors.items() if not k.endswith(".dora_scale")}
    style, raws = _group_keys(path, tensors, metadata) if tensors or not lycoris else ("kohya", {})
    for raw in raws.values():
        _check_raw(path, raw)
    sgm = any(r.kohya_stem and re.search(r"_(input_blocks|output_blocks|middle_block)_", r.kohya_stem)
              for r in raws.values())
    sgm = sgm or any(re.search(r"_(input_blocks|output_blocks|middle_block)_", stem) for stem in lycoris)
    entries = [(r.component, r.path, tuple(r.down.shape)) for r in raws.values()]
    for stem, module in lycoris.items():
        component, module_path = _kohya_raw(stem).component, _kohya_raw(stem).path
        entries.append((component, module_path, (module.rank, module.out_in[1])))
    family = _family_from(entries, metadata, sgm)
    modules: dict = {}
    for raw in raws.values():
        name = _canonical_name(raw, family)
        if name in modules:
            raise LoraFileError(f"{path.name} holds the layer {name} twice (as {raw.label} too).",
                                hint="The file is malformed; export it again.")
        modules[name] = LoraModule(name, raw.down, raw.up, raw.alpha, _dora_scale(path, raw, dora.pop(raw.label, None)))
    if dora:
        raise LoraFileError(f"{path.name} has a dora_scale for {min(dora)} but no LoRA weights for it.",
                            hint="The file is malformed; export it again.")
    for stem, module in lycoris.items():
        if stem in modules:
            raise LoraFileError(f"{path.name} holds the layer {stem} twice.", hint="The file is malformed.")
        modules[stem] = module
    dtypes = collections.Counter(_TORCH_DTYPE_NAMES[next(iter(m.tensors().values())).dtype] for m in modules.values())
    return LoraFile(path, style, family, modules, metadata, dtypes.most_common(1)[0][0])


def _read_peft_adapters(path: Path) -> LoraFile:
    """A PEFT folder (per-component adapters), one adapter folder, or one adapter's weights file."""
    if path.is_file() or (path / PEFT_CONFIG).is_file():
        adapters = [path.parent if path.is_file() else path]
    else:
        adapters = [path / c for c in COMPONENTS if (path / c / PEFT_CONFIG).is_file()]
        if not adapters and (path / DIFFUSERS_WEIGHTS).is_file():
            return read_lora_file(path / DIFFUSERS_WEIGHTS)
        if not adapters:
            raise LoraFileError(f"{path} is a folder, and holds no PEFT adapter (adapter_config.json).",
                                hint="Pick a LoRA .safetensors file, or a LoRA Studio 'name-peft' folder.")
    tensors: dict[str, torch.Tensor] = {}
    config: dict = {}
    for folder in adapters:
        component = folder.name if folder.name in COMPONENTS else None  # else told apart by module names
        weights = folder / PEFT_WEIGHTS
        if not weights.is_file():
            raise LoraFileError(f"{folder} has {PEFT_CONFIG} but no {PEFT_WEIGHTS}.", hint="Export it again.")
        adapter = _peft_adapter_config(folder / PEFT_CONFIG)
        config.update({f"{component}.{k}": v for k, v in adapter.items()} if component else adapter)
        for key, tensor in _load_checked(weights)[0].items():
            key = key.removeprefix("base_model.model.")
            tensors[f"{component}.{key}" if component else key] = tensor
    return _lora_file(path, tensors, {"lora_adapter_metadata": json.dumps(config)})


def _peft_adapter_config(path: Path) -> dict:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LoraFileError(f"{path} could not be read as JSON ({exc}).", hint="Export the PEFT folder again.") from None
    if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA" or config.get("use_dora"):
        kind = "DoRA" if isinstance(config, dict) and config.get("use_dora") else "non-LoRA"
        raise LoraFileError(f"{path} describes a {kind} adapter, not a plain LoRA.",
                            hint="LoRA Studio loads plain LoRA adapters only.")
    return {k: config[k] for k in ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora") if k in config}


# --- header checks -------------------------------------------------------------------------------


def _check_weight_dtypes(path: Path, header: dict) -> None:
    for name, info in header.items():
        if not name.endswith(".alpha") and info["dtype"] not in _FLOAT_DTYPES:
            raise LoraFileError(
                f"{path.name}: '{name}' is stored as {info['dtype']}, but LoRA weights must be floating point "
                "(F16, BF16, F32).", hint="This is not a LoRA file LoRA Studio can use (quantised or corrupt).")


# --- key styles ----------------------------------------------------------------------------------


def _group_keys(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, dict]:
    raws: dict[tuple, _RawModule] = {}
    styles = set()
    peft_alphas: dict[tuple, float] = {}
    for key, tensor in tensors.items():
        for pattern, kind in _UNSUPPORTED:
            if pattern.search(key):
                raise LoraFileError(f"{path.name} is a {kind} network (key '{key}'), not a plain LoRA.",
                                    hint="LoRA Studio loads plain LoRA files only; use a LoRA export of it.")
        if m := _KOHYA_KEY.match(key):
            styles.add("kohya")
            stem, part = m.groups()
            if ("kohya", stem) not in raws:
                raws[("kohya", stem)] = _kohya_raw(stem)
            raw = raws[("kohya", stem)]
            _assign(path, raw, {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}[part], tensor, key)
        elif (m := _PEFT_KEY.match(key)) and (where := _component_path(m.group(1), m.group(2))):
            styles.add("peft")
            component, module_path = where
            raw = raws.setdefault((component, module_path), _RawModule(component, module_path, key.split(".lora_")[0]))
            _assign(path, raw, "down" if m.group(3) == "A" else "up", tensor, key)
        elif (m := _OLD_PROCESSOR_KEY.match(key)) and (where := _component_path(m.group(1), m.group(2))):
            styles.add("diffusers-old")
            component, base = where
            proj = (_OLD_UNET_PROJ if component == "unet" else _OLD_TE_PROJ)[m.group(3)]
            module_path = f"{base}.{proj}"
            raw = raws.setdefault((component, module_path), _RawModule(component, module_path, key.rsplit(".", 2)[0]))
            _assign(path, raw, m.group(4), tensor, key)
        elif (m := _OLD_LAYER_KEY.match(key)) and (where := _component_path(m.group(1), m.group(2))):
            styles.add("diffusers-old")
            component, module_path = where
            raw = raws.setdefault((component, module_path), _RawModule(component, module_path, key.rsplit(".", 2)[0]))
            _assign(path, raw, m.group(3), tensor, key)
        elif (m := _PEFT_ALPHA.match(key)) and (where := _component_path(m.group(1), m.group(2))):
            peft_alphas[where] = _scalar(path, key, tensor)
        else:
            raise LoraFileError(f"{path.name} has the key '{key}', which is not part of a LoRA for Stable Diffusion.",
                                hint="Only kohya, diffusers/PEFT and old diffusers LoRA files for SD 1.x, SD 2.x "
                                     "and SDXL can be loaded.")
    if len(styles) > 1:
        raise LoraFileError(f"{path.name} mixes LoRA key styles ({', '.join(sorted(styles))}).",
                            hint="The file is malformed; export it again in one format.")
    if not raws:
        raise LoraFileError(f"{path.name} holds no LoRA weights.", hint="Pick a LoRA .safetensors file.")
    style = styles.pop()
    if style == "peft":
        _apply_peft_alphas(path, raws, metadata, peft_alphas)
    for raw in raws.values():
        if raw.alpha is None and raw.down is not None:
            raw.alpha = float(raw.down.shape[0])  # no alpha stored: every loader uses scale 1
    return style, raws


def _kohya_raw(stem: str) -> _RawModule:
    try:
        component, module_path = parse_kohya_module_name(stem)
    except ValueError:
        component = "text_encoder_2" if stem.startswith("lora_te2_") else (
            "unet" if stem.startswith("lora_unet_") else "text_encoder")
        module_path = None
    return _RawModule(component, module_path, stem, kohya_stem=stem)


def _component_path(prefix: str | None, module_path: str) -> tuple[str, str] | None:
    """(component, path) of a diffusers/PEFT key, or None when it is no SD UNet/CLIP layer."""
    if prefix in ("unet", "text_encoder", "text_encoder_2"):
        component = prefix
    else:  # bare keys (or peft's base_model.model.): text-encoder layers have CLIP's names
        component = "text_encoder" if module_path.startswith(("text_model.", "encoder.layers.")) else "unet"
    if component != "unet":
        module_path = canonical_te_path(module_path)
    roots = _UNET_ROOTS if component == "unet" else _TE_ROOTS
    return (component, module_path) if module_path.split(".", 1)[0] in roots else None


def _assign(path: Path, raw: _RawModule, part: str, tensor: torch.Tensor, key: str) -> None:
    if part == "alpha":
        raw.alpha = _scalar(path, key, tensor)
    elif getattr(raw, part) is not None:
        raise LoraFileError(f"{path.name} holds the {part} weight of {raw.label} twice.",
                            hint="The file is malformed; export it again.")
    else:
        setattr(raw, part, tensor)


def _scalar(path: Path, key: str, tensor: torch.Tensor) -> float:
    if tensor.numel() != 1:
        raise LoraFileError(f"{path.name}: '{key}' should be one number but has shape {tuple(tensor.shape)}.",
                            hint="The file is malformed; export it again.")
    value = float(tensor.item())
    if not math.isfinite(value):
        raise LoraFileError(f"{path.name}: '{key}' is {value}.", hint="The file is damaged; export it again.")
    return value


def _apply_peft_alphas(path: Path, raws: dict, metadata: dict[str, str], explicit: dict[tuple, float]) -> None:
    """PEFT alpha comes from diffusers' ``lora_adapter_metadata`` (LoraConfig kwargs per component)."""
    config: dict = {}
    if raw_config := metadata.get("lora_adapter_metadata"):
        try:
            config = json.loads(raw_config)
        except json.JSONDecodeError:
            raise LoraFileError(f"{path.name}: its lora_adapter_metadata is not valid JSON.",
                                hint="The file is damaged; export it again.") from None
    for (component, module_path), raw in raws.items():
        if raw.down is None:
            continue
        rank = int(raw.down.shape[0])
        if (component, module_path) in explicit:
            raw.alpha = explicit[(component, module_path)]
            continue
        own = {k[len(component) + 1:]: v for k, v in config.items() if k.startswith(component + ".")}
        cfg = own or {k: v for k, v in config.items() if "." not in k}
        lora_alpha = _pattern_value(cfg.get("alpha_pattern") or {}, component, module_path, cfg.get("lora_alpha"))
        if lora_alpha is None:
            continue  # no metadata: diffusers' convention is alpha = rank
        scale = float(lora_alpha) / (math.sqrt(rank) if cfg.get("use_rslora") else rank)
        raw.alpha = scale * rank


def _pattern_value(patterns: dict, component: str, module_path: str, default):
    candidates = [module_path] if component == "unet" else [module_path, "text_model." + module_path]
    for pattern, value in patterns.items():
        regex = pattern[1:] if pattern.startswith("^") else rf"(.*\.)?{pattern}"
        if any(re.fullmatch(regex, c) for c in candidates):
            return value
    return default


def _check_raw(path: Path, raw: _RawModule) -> None:
    for part, other in (("down", "up"), ("up", "down")):
        if getattr(raw, part) is None:
            raise LoraFileError(f"{path.name}: the layer {raw.label} has a lora_{other} weight but no lora_{part}.",
                                hint="The file is incomplete or malformed; export it again.")
    down, up = raw.down, raw.up
    if down.dim() not in (2, 4) or up.dim() != down.dim() or (up.dim() == 4 and tuple(up.shape[2:]) != (1, 1)):
        raise LoraFileError(f"{path.name}: the layer {raw.label} has down {tuple(down.shape)} and up "
                            f"{tuple(up.shape)}, which is not a LoRA pair.", hint="The file is malformed.")
    if down.shape[0] != up.shape[1]:
        raise LoraFileError(f"{path.name}: the layer {raw.label} has rank {down.shape[0]} in lora_down but "
                            f"{up.shape[1]} in lora_up.", hint="The file is malformed; export it again.")
    if raw.alpha is not None and raw.alpha <= 0:  # loaders disagree: A1111/ComfyUI scale 0, kohya alpha = rank
        raise LoraFileError(f"{path.name}: the layer {raw.label} has alpha {raw.alpha:g}; a LoRA's strength is "
                            "alpha / rank, so it would do nothing (0) or act in reverse (negative).",
                            hint="The file is malformed; export it again with alpha > 0 (alpha = rank for strength 1).")
    for part, tensor in (("down", down), ("up", up)):
        if not torch.isfinite(tensor).all():
            raise LoraFileError(f"{path.name}: the {part} weight of {raw.label} contains NaN or infinite values.",
                                hint="The LoRA was saved from a diverged training run; use an earlier checkpoint.")


def _dora_scale(path: Path, raw: _RawModule, scale: torch.Tensor | None) -> torch.Tensor | None:
    """A DoRA magnitude as [out, 1(, 1, 1)] (LyCORIS wd_on_out); [1, in(, 1, 1)] files are refused."""
    if scale is None:
        return None
    out_features = int(raw.up.shape[0])
    if scale.numel() != out_features or (scale.dim() > 1 and scale.shape[0] != out_features):
        raise LoraFileError(f"{path.name}: the dora_scale of {raw.label} has shape {tuple(scale.shape)}; LoRA Studio "
                            f"reads DoRA normalised per output row ([{out_features}, 1], LyCORIS's wd_on_out).",
                            hint="Re-train it with wd_on_out, or load it in a tool that reads input-axis DoRA.")
    if not torch.isfinite(scale.float()).all():
        raise LoraFileError(f"{path.name}: the dora_scale of {raw.label} has NaN or infinite values.")
    return scale.reshape(out_features, *[1] * (raw.down.dim() - 1))


def _canonical_name(raw: _RawModule, family: str | None) -> str:
    if raw.path is not None:
        try:
            return kohya_module_name(raw.component, raw.path, family or ("sdxl" if raw.component == "text_encoder_2"
                                                                          else "sd1"))
        except ValueError:
            pass
    if raw.kohya_stem:
        return raw.kohya_stem
    prefix = {"unet": "lora_unet_", "text_encoder": "lora_te_text_model_", "text_encoder_2": "lora_te2_text_model_"}
    return prefix[raw.component] + raw.path.replace(".", "_")


# --- family detection ----------------------------------------------------------------------------


def _family_from(entries, metadata: dict[str, str], sgm_names: bool) -> str | None:
    """entries: (component, module path or None, down shape). Shapes first, then names, then metadata."""
    entries = list(entries)
    cross = {_CROSS_ATTN_WIDTH.get(shape[1]) for component, module_path, shape in entries
             if component == "unet" and module_path and re.search(r"attn2\.to_[kv]$", module_path)}
    cross.discard(None)
    if len(cross) == 1:
        return cross.pop()
    if any(component == "text_encoder_2" for component, _, _ in entries) or sgm_names:
        return "sdxl"
    te = {_TE_WIDTH.get(shape[1]) for component, module_path, shape in entries
          if component == "text_encoder" and module_path and re.search(r"(q_proj|k_proj|v_proj|fc1)$", module_path)}
    te.discard(None)
    if len(te) == 1:
        return te.pop()
    return _family_from_metadata(metadata)


def _family_from_metadata(metadata: dict[str, str]) -> str | None:
    version = metadata.get("ss_base_model_version", "")
    architecture = metadata.get("modelspec.architecture", "")
    if version.startswith("sdxl") or architecture.startswith("stable-diffusion-xl"):
        return "sdxl"
    if version.startswith("sd_v2") or architecture.startswith("stable-diffusion-v2") or metadata.get("ss_v2") == "True":
        return "sd2"
    if version.startswith("sd_v1") or architecture.startswith("stable-diffusion-v1"):
        return "sd1"
    return None
