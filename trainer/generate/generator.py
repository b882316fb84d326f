"""txt2img with any number of LoRA files mixed in: W = W0 + Σ wᵢ·(αᵢ/rᵢ)·BᵢAᵢ.

A ``Generator`` holds one loaded base model and its diffusers pipeline for as long as the user
keeps it; LoRA files come and go as peft adapters on that pipeline (``load_lora_weights`` with
an adapter name per file, ``set_adapters`` for the weights), so changing a weight or adding a
file never reloads the base.

Every file goes through ``read_lora_file`` first (safetensors only, any key style, validated)
and is matched against *this* model's layers before diffusers sees it: a file for another family
is refused, layers whose shapes do not fit are refused, and layers the model does not have are
reported rather than silently dropped. diffusers then receives a PEFT-style state dict of exactly
the matched layers, with each layer's α/r folded into B, so one rule (scale = 1 × weight) holds
whatever convention the file used.

When the same weights serve several images the adapters are fused into the base weights (no
extra matmuls per step). Unfusing by subtraction would drift by a rounding error each time, in
fp32 as in fp16/bf16 ((W + D) - D is not W in floating point), so the untouched weights of every
fused layer are kept aside (in host memory) and copied back instead: with every LoRA off the
base weights are bit-identical to the loaded ones on every path and precision.
``fuse_lora`` is only ever called with ``lora_scale=1`` (a different scale would stay in the
adapters after unfusing) and ``set_adapters`` is called again after every unfuse (DESIGN §7).
Unfused (``fuse=False``), the enabled adapters of each layer are packed into one low-rank pair
added by one fused multiply-add (``trainer.generate.packed``), so two or more files cost about what
their ranks cost, not peft's extra passes per adapter.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trainer.core.devices import is_out_of_memory, resolve_device
from trainer.core.errors import ConfigError, LoraFileError, StudioError
from trainer.core.hashing import file_sha256
from trainer.generate.infotext import (
    Infotext,
    LoraTag,
    lora_tags,
    strip_lora_tags,
)
from trainer.generate.matching import (
    LoraMatch,
    block_multipliers,
    layer_index,
    lbw_vector,
    match_lora,
    model_components,
    module_factors,
)
from trainer.generate.packed import PackedAdapters, pack_adapters
from trainer.generate.prompt_file import MAX_SIDE
from trainer.generate.requests import (
    BlockWeights,
    GeneratedImage,
    GenerationProgress,
    GenerationRequest,
    LoraSpec,
    _path_key,
)
from trainer.generate.schedulers import make_scheduler, parse_sampler
from trainer.lora.reading import LoraFile, check_lora_fits, read_lora_file
from trainer.lora.writing import tensor_data_sha256
from trainer.models.text import check_clip_skip

ADAPTER_PREFIX = "lsgen"  # + 3 digits: never a substring of a module path (DESIGN §7)


# --- the generator -------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoraLoadReport:
    """What loading one LoRA file found."""

    path: Path
    name: str
    adapter: str
    family: str | None
    style: str
    network_type: str
    layers: int
    unmatched: tuple[str, ...]
    short_hash: str  # A1111's LoRA hash (first 12 hex digits of sshs_model_hash)

    def notes(self) -> list[str]:
        if not self.unmatched:
            return []
        shown = ", ".join(self.unmatched[:3]) + (", ..." if len(self.unmatched) > 3 else "")
        return [(f"{self.path.name}: {len(self.unmatched)} of {self.layers + len(self.unmatched)} layers match nothing "
                f"in this model and were skipped ({shown}).")]


@dataclass
class _Adapter:
    report: LoraLoadReport
    stamp: tuple[int, int]  # (mtime_ns, size): reload when the file changes
    components: frozenset[str]


class Generator:
    """One base model + pipeline; LoRA adapters are added, re-weighted and removed without reloading it."""

    def __init__(self, model: Any, *, device: str | torch.device | None = None, fuse: bool = True,
                 model_hash: str | None = None) -> None:
        from trainer.generate.pipeline import inference_pipeline

        self.model = model
        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        self.pipe = inference_pipeline(model)
        self.pipe.to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        self.fuse = fuse
        self._model_hash = model_hash
        self._index = layer_index(model)
        self._adapters: dict[str, _Adapter] = {}  # resolved path -> adapter
        self._counter = 0
        self._applied: tuple | None = None  # the weights currently set (None = unknown)
        self._fused_components: list[str] = []
        self._originals: dict[tuple[str, str], torch.Tensor] = {}  # (component, path) -> W0 kept while fused
        self._packed: PackedAdapters | None = None  # unfused: the last packing, attached while it applies

    @classmethod
    def from_base(cls, base: str, *, base_config: str = "", precision: str = "auto",
                  device: str | None = None, fuse: bool = True) -> Generator:
        """Load ``base`` (diffusers folder, single .safetensors file or hub id) for generation."""
        from trainer.config.schema import ModelConfig
        from trainer.models.loading import load_base_model

        target = resolve_device(device)  # before loading: a device that is not here fails now
        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(
            precision, torch.float16 if target.type == "cuda" else torch.float32)
        model = load_base_model(ModelConfig(base=base, base_config=base_config), dtype=dtype,
                                supported=("sd1", "sd2", "sdxl"))
        return cls(model, device=target, fuse=fuse)

    # --- LoRA files ------------------------------------------------------------------------------

    def prepare(self, request: GenerationRequest) -> list[str]:
        """Check the request against the model and load (or keep) exactly its LoRA files.

        Returns notes for the user (layers that matched nothing, prompt tags without a file);
        raises for anything that would stop generation, before any image work starts.
        """
        self._size(request)
        check_clip_skip(self.model.name, self.model.text_encoders(), request.clip_skip)
        wanted = {_path_key(spec.path): spec for spec in request.loras}
        stale = [key for key, adapter in self._adapters.items()
                 if key not in wanted or adapter.stamp != _file_stamp(Path(key), missing_ok=True)]
        if stale:
            self._unfuse()
            self._drop_packed()
            self.pipe.delete_adapters([self._adapters[key].report.adapter for key in stale])
            for key in stale:
                del self._adapters[key]
            self._applied = None
        notes: list[str] = []
        for key, spec in wanted.items():
            if key not in self._adapters:
                self._unfuse()
                self._drop_packed()
                self._adapters[key] = self._load(Path(spec.path))
                self._applied = None
            notes.extend(self._adapters[key].report.notes())
        given = {spec.name for spec in request.loras}
        for tag in lora_tags(request.prompt):
            if tag.name not in given:
                notes.append(f"The prompt names <lora:{tag.name}> but no LoRA file {tag.name}.safetensors was "
                             "given; the tag is ignored (LoRAs are added as files with their weights, not in the prompt).")
        return notes

    def report(self, path: str | Path) -> LoraLoadReport:
        return self._adapters[_path_key(path)].report

    def _load(self, path: Path) -> _Adapter:
        stamp = _file_stamp(path)  # before reading: a file replaced meanwhile is reloaded next time
        file = read_lora_file(path)
        check_lora_fits(file, self.model.family)
        match = match_lora(file, self._index)
        self._counter += 1
        adapter_name = f"{ADAPTER_PREFIX}{self._counter:03d}"
        state: dict[str, torch.Tensor] = {}
        components = model_components(self.model)
        for name, ref in match.targets.items():
            module = file.modules[name]
            layer = components[ref.component].get_submodule(ref.path)  # unfused here: W0 itself
            base = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
            # LoHa/LoKr/DoRA come as their exact low-rank (DoRA: full-rank) update; adapter scale is then 1
            down, up = module_factors(module, ref, base.weight.detach().float().cpu() if module.kind == "dora" else None)
            state[f"{ref.component}.{ref.path}.lora_A.weight"] = down
            state[f"{ref.component}.{ref.path}.lora_B.weight"] = up
        try:
            with _quiet_adapter_loading():
                self.pipe.load_lora_weights(state, adapter_name=adapter_name)
        except (ValueError, RuntimeError, KeyError) as exc:
            self._drop_partial(adapter_name)
            first_line = (str(exc).strip() or type(exc).__name__).splitlines()[0]
            raise LoraFileError(f"diffusers could not load {path.name}: {first_line}",
                                hint="Nothing of it was applied; please report this file.") from exc
        self._verify_loaded(path, adapter_name, match)
        report = LoraLoadReport(path=path, name=path.stem, adapter=adapter_name, family=file.family, style=file.style,
                                network_type=file.network_type, layers=len(match.targets), unmatched=match.unmatched, short_hash=lora_short_hash(file))
        return _Adapter(report, stamp, frozenset(ref.component for ref in match.targets.values()))

    def _verify_loaded(self, path: Path, adapter_name: str, match: LoraMatch) -> None:
        # Never a silent partial load: every matched layer must now carry the adapter.
        from peft.tuners.lora import LoraLayer

        components = model_components(self.model)
        missing = []
        for ref in match.targets.values():
            layer = components[ref.component].get_submodule(ref.path)
            if not (isinstance(layer, LoraLayer) and adapter_name in layer.lora_A):
                missing.append(f"{ref.component}.{ref.path}")
        if missing:
            self._drop_partial(adapter_name)
            raise LoraFileError(f"diffusers did not attach {len(missing)} layers of {path.name} (e.g. {missing[0]}).",
                                hint="Please report this file; nothing of it was applied.")

    def _drop_partial(self, adapter_name: str) -> None:
        if any(adapter_name in names for names in self.pipe.get_list_adapters().values()):
            self.pipe.delete_adapters([adapter_name])

    # --- weights ---------------------------------------------------------------------------------

    def apply(self, loras: Sequence[LoraSpec]) -> None:
        """Set the weights of the enabled LoRAs (all loaded by ``prepare``); others are off."""
        active = [(self._adapters[_path_key(spec.path)], spec) for spec in loras if spec.enabled]
        signature = tuple((a.report.adapter, spec.te, spec.unet, spec.blocks) for a, spec in active)
        if signature == self._applied:
            return
        self._unfuse()
        if self._packed is not None:
            self._packed.detach()  # peft's own state again while the weights are set
        self._enable_adapters(bool(active))
        if not active:
            self._applied = signature
            return
        names = [adapter.report.adapter for adapter, _ in active]
        weights = []
        for adapter, spec in active:
            per_component = {"unet": spec.unet, "text_encoder": spec.te * spec.blocks.te,
                             "text_encoder_2": spec.te * spec.blocks.te}
            weights.append({c: w for c, w in per_component.items() if c in adapter.components})
        self.pipe.set_adapters(names, adapter_weights=weights)
        for adapter, spec in active:
            if not spec.blocks.is_identity and "unet" in adapter.components:
                self._set_block_scales(adapter.report.adapter, spec.unet, spec.blocks)
        if self.fuse:
            self._fuse(names, sorted({c for adapter, _ in active for c in adapter.components}))
        else:
            self._pack(names, signature)
        self._applied = signature

    def _enable_adapters(self, enabled: bool) -> None:
        # Per component: diffusers' pipe.enable_lora/disable_lora raise for a component without adapters.
        from diffusers.utils.peft_utils import set_adapter_layers
        from peft.tuners.tuners_utils import BaseTunerLayer

        for module in model_components(self.model).values():
            if any(isinstance(layer, BaseTunerLayer) for layer in module.modules()):
                set_adapter_layers(module, enabled=enabled)

    def _set_block_scales(self, adapter_name: str, unet_weight: float, blocks: BlockWeights) -> None:
        from peft.tuners.lora import LoraLayer

        multiplier = block_multipliers(self.model.unet, blocks)
        for path, layer in self.model.unet.named_modules():
            if isinstance(layer, LoraLayer) and adapter_name in layer.lora_A:
                layer.set_scale(adapter_name, unet_weight * multiplier(path))

    def _pack(self, names: list[str], signature: tuple) -> None:
        # One packing is kept: switching the LoRAs off and on again (compare mode) reuses it.
        if self._packed is None or self._packed.key != signature:
            self._drop_packed()
            self._packed = pack_adapters(model_components(self.model), names, key=signature)
        self._packed.attach()

    def _drop_packed(self) -> None:
        if self._packed is not None:
            self._packed.detach()
            self._packed = None

    def _fuse(self, names: list[str], components: list[str]) -> None:
        from peft.tuners.lora import LoraLayer

        parts = model_components(self.model)
        for component in components:
            for path, layer in parts[component].named_modules():
                base = layer.get_base_layer() if isinstance(layer, LoraLayer) else None
                if base is not None and any(n in layer.lora_A for n in names):
                    self._originals[(component, path)] = base.weight.detach().to("cpu", copy=True)
        self.pipe.fuse_lora(components=components, lora_scale=1.0, adapter_names=names)
        self._fused_components = components

    def _unfuse(self) -> None:
        if not self._fused_components:
            return
        self.pipe.unfuse_lora(components=self._fused_components)
        parts = model_components(self.model)
        with torch.no_grad():
            for (component, path), original in self._originals.items():
                parts[component].get_submodule(path).get_base_layer().weight.copy_(original)
        self._originals.clear()
        self._fused_components = []
        self._applied = None  # set_adapters must run again after unfusing (DESIGN §7)

    # --- images ----------------------------------------------------------------------------------

    def generate(self, request: GenerationRequest,
                 on_progress: Callable[[GenerationProgress], None] | None = None) -> list[GeneratedImage]:
        """Render the request. With ``compare_without_loras`` the list alternates LoRA on / off per seed."""
        self.prepare(request)
        width, height = self._size(request)
        choice = parse_sampler(request.scheduler)
        self.pipe.scheduler = make_scheduler(choice, self.model.scheduler_config, self.model.prediction_type)
        first_seed = request.seed if request.seed >= 0 else secrets.randbelow(2 ** 32)
        seeds = [first_seed + i for i in range(request.batch_count)]
        enabled = [spec for spec in request.loras if spec.enabled]
        passes = [True, False] if request.compare_without_loras and enabled else [bool(enabled)]
        total = len(seeds) * len(passes)
        rendered: dict[tuple[bool, int], GeneratedImage] = {}
        for loras_on in passes:
            self.apply(enabled if loras_on else [])
            for seed in seeds:
                progress = None
                if on_progress is not None:
                    index = len(rendered)
                    progress = lambda step, i=index: on_progress(GenerationProgress(i, total, step, request.steps))
                image = self._render(request, seed, width, height, progress)
                info = self._infotext(request, choice, seed, width, height, enabled if loras_on else [])
                rendered[(loras_on, seed)] = GeneratedImage(image, seed, info, loras_on)
        return [rendered[(on, seed)] for seed in seeds for on in passes]

    def _size(self, request: GenerationRequest) -> tuple[int, int]:
        factor = self.model.vae_scale_factor
        native = self.model.native_resolution
        width, height = request.width or native, request.height or native
        for label, value in (("width", width), ("height", height)):
            if value > MAX_SIDE:  # refused before a many-GB allocation fails minutes later
                raise ConfigError(f"The {label} {value} is larger than {MAX_SIDE} px, more than one pass renders.",
                                  hint=f"Render at the model's size ({native}×{native}), or up to {MAX_SIDE} px, "
                                       "and upscale the picture.")
            if value % factor:
                low, high = value // factor * factor, (value // factor + 1) * factor
                raise ConfigError(f"The {label} {value} is not a multiple of {factor}, which this model needs.",
                                  hint=f"Use {low} or {high}." if low else f"Use {high} (or another multiple of {factor}).")
        return width, height

    def _render(self, request: GenerationRequest, seed: int, width: int, height: int,
                progress: Callable[[int], None] | None) -> Any:
        generator = torch.Generator("cpu").manual_seed(seed)  # CPU noise: same image on any device

        def step_end(pipe: Any, step: int, timestep: Any, kwargs: dict) -> dict:
            progress(step + 1)
            return kwargs

        try:
            with torch.inference_mode():
                result = self.pipe(
                    prompt=strip_lora_tags(request.prompt),
                    negative_prompt=request.negative_prompt or None,
                    num_inference_steps=request.steps,
                    guidance_scale=request.cfg_scale,
                    width=width,
                    height=height,
                    generator=generator,
                    clip_skip=request.clip_skip - 1 or None,
                    callback_on_step_end=step_end if progress else None,
                )
        except RuntimeError as exc:
            if not is_out_of_memory(exc):
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            where = "GPU" if self.device.type in ("cuda", "mps") else "CPU"
            native = self.model.native_resolution
            raise StudioError(f"Ran out of {where} memory rendering a {width}×{height} picture.",
                              hint=f"Use a smaller size (this model's native size is {native}×{native}), or close "
                                   f"other programs using the {where}.") from None
        return result.images[0]

    def _infotext(self, request: GenerationRequest, choice: Any, seed: int, width: int, height: int,
                  loras: Sequence[LoraSpec]) -> Infotext:
        tags, hashes = [], {}
        for spec in loras:
            report = self._adapters[_path_key(spec.path)].report
            lbw = "" if spec.blocks.is_identity else ",".join(
                f"{v:g}" for v in lbw_vector(self.model.unet, spec.blocks))
            tags.append(LoraTag(spec.name, spec.te, spec.unet if spec.unet != spec.te else None, lbw).text())
            if report.short_hash:
                hashes[spec.name] = report.short_hash
        prompt = " ".join([strip_lora_tags(request.prompt), *tags]).strip()
        extra = {"Clip skip": str(request.clip_skip)} if request.clip_skip > 1 else {}
        return Infotext(prompt=prompt, negative_prompt=request.negative_prompt, steps=request.steps,
                        sampler=choice.sampler, schedule_type=choice.schedule, cfg_scale=request.cfg_scale,
                        seed=seed, width=width, height=height, model_hash=self.model_hash, model=self.model.name,
                        lora_hashes=hashes, extra=extra)

    @property
    def model_hash(self) -> str:
        """A1111's model hash (sha256 of the checkpoint file, 10 hex digits); "" for folders."""
        if self._model_hash is None:
            source = Path(self.model.source)
            self._model_hash = file_sha256(source)[:10] if source.is_file() else ""
        return self._model_hash


# --- files ---------------------------------------------------------------------------------------


def lora_short_hash(file: LoraFile) -> str:
    """A1111's LoRA hash: the header's sshs_model_hash, else sha256 of the bytes after the header
    ("" for a PEFT folder: A1111 has no hash for it, as it cannot load it)."""
    digest = file.metadata.get("sshs_model_hash") or (tensor_data_sha256(file.path) if file.path.is_file() else "")
    return digest[:12]


def _file_stamp(path: Path, missing_ok: bool = False) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        if missing_ok:
            return None
        raise LoraFileError(f"LoRA file not found: {path}.", hint="Check the path.") from None
    return stat.st_mtime_ns, stat.st_size


@contextlib.contextmanager
def _quiet_adapter_loading() -> Iterator[None]:
    """Silence two false alarms of loading a second adapter (we verify the result ourselves):
    transformers 5 reports the first adapter's weights as "MISSING", and peft warns that the
    model already has a peft_config, which is exactly what multi-adapter mixing means."""
    peft_logger = logging.getLogger("transformers.integrations.peft")
    level = peft_logger.level
    peft_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Already found a `peft_config` attribute")
            yield
    finally:
        peft_logger.setLevel(level)
