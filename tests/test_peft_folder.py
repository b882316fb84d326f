"""--export-peft: a name-peft/ folder as peft's save_pretrained writes it, loading with peft and diffusers to
what the kohya file gives, and never listed as a LoRA by the UIs; a real run writes it with its sidecars."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch
import ui_readers
from library_logs import library_warnings
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import check_target_module_exists
from test_formats import (
    _assert_loads_like_hand_merge,
    _export_modules,
    _info,
    _outputs,
    _trained_tiny,
)

from trainer.config.presets import resolve_config
from trainer.config.schema import NetworkConfig
from trainer.core.errors import LoraFileError, StudioError
from trainer.lora.metadata import build_metadata
from trainer.lora.names import parse_kohya_module_name
from trainer.lora.peft_folder import (
    DIFFUSERS_WEIGHTS,
    PEFT_CONFIG,
    PEFT_WEIGHTS,
    adapter_config,
    peft_folder_for,
    save_peft_folder,
)
from trainer.lora.reading import read_lora_file
from trainer.lora.sidecars import json_path, preview_path
from trainer.lora.writing import save_kohya_lora, save_peft_lora
from trainer.models.demo import build_tiny_sd1
from trainer.train.events import RunFinished, SamplesMade
from trainer.train.loop import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")
NETWORK = NetworkConfig(rank=4, alpha=3, targets="full", te_mlp=True)  # alpha != rank: a lost alpha shows


def _export(tmp_path: Path, network: NetworkConfig = NETWORK):
    parts, _ = _trained_tiny(network)
    modules = _export_modules(parts, network)
    kohya = tmp_path / "lora.safetensors"
    save_kohya_lora(modules, build_metadata(_info(rank=network.rank, alpha=network.alpha, rslora=network.rslora)),
                    kohya, dtype="fp32")
    folder = save_peft_folder(modules, peft_folder_for(kohya), dtype="fp32", rslora=network.rslora,
                              models={"unet": parts.unet, "text_encoder": parts.text_encoder})
    return parts, modules, kohya, folder


def _targeted(adapter: Path, model: torch.nn.Module) -> set[str]:
    config = LoraConfig.from_pretrained(str(adapter))
    return {name for name, _ in model.named_modules() if name and check_target_module_exists(config, name)}


def test_the_folder_is_what_peft_save_pretrained_writes(tmp_path):
    parts, modules, _, folder = _export(tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", DIFFUSERS_WEIGHTS, "text_encoder", "unet"]
    fresh, plain = build_tiny_sd1(seed=0), build_tiny_sd1(seed=0)
    for component in ("unet", "text_encoder"):
        entries = [(path, m) for m in modules for c, path in [parse_kohya_module_name(m.name)] if c == component]
        reference = get_peft_model(getattr(fresh, component), adapter_config(entries))
        with torch.no_grad():
            for path, module in entries:
                layer = reference.base_model.model.get_submodule(path)
                layer.lora_A["default"].weight.copy_(module.down)
                layer.lora_B["default"].weight.copy_(module.up)
        reference.save_pretrained(tmp_path / "reference" / component)
        ours, theirs = folder / component, tmp_path / "reference" / component
        assert {PEFT_CONFIG, PEFT_WEIGHTS} <= {p.name for p in theirs.iterdir()}
        assert sorted(p.name for p in ours.iterdir()) == [PEFT_CONFIG, PEFT_WEIGHTS]
        mine, peft_own = (json.loads((d / PEFT_CONFIG).read_text()) for d in (ours, theirs))
        # peft shortens a long list to suffixes that pick the same layers; ours lists them in full
        model = getattr(plain, component)
        assert _targeted(ours, model) == _targeted(theirs, model) == {path for path, _ in entries}
        assert {k: v for k, v in mine.items() if k != "target_modules"} == \
            {k: v for k, v in peft_own.items() if k != "target_modules"}
        a, b = (safetensors.torch.load_file(str(d / PEFT_WEIGHTS)) for d in (ours, theirs))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        with safetensors.safe_open(str(ours / PEFT_WEIGHTS), "pt") as fh:
            assert fh.metadata() == {"format": "pt"}
    unet_config = json.loads((folder / "unet" / PEFT_CONFIG).read_text())
    assert (unet_config["r"], unet_config["lora_alpha"], unet_config["use_rslora"]) == (4, 3.0, False)
    assert len(unet_config["target_modules"]) == 48 and unet_config["auto_mapping"]["base_model_class"] == \
        "UNet2DConditionModel"


def test_the_folder_loads_in_peft_and_diffusers_to_the_kohya_files_outputs(tmp_path, tiny_sd1_dir):
    # rsLoRA: the config holds peft's own use_rslora with the trained alpha (scale alpha/sqrt(r)), the
    # kohya file alpha*sqrt(r) (scale alpha/r); plain LoRA's scale is checked by the layout and reader tests
    network = NetworkConfig(rank=4, alpha=3, targets="full", te_mlp=True, rslora=True)
    parts, modules, kohya, folder = _export(tmp_path, network)
    config = json.loads((folder / "unet" / PEFT_CONFIG).read_text())
    assert (config["lora_alpha"], config["use_rslora"]) == (3.0, True) and modules[0].alpha == 6.0
    # peft: each component folder into a fresh base model
    fresh = build_tiny_sd1(seed=0)
    with library_warnings() as messages:
        PeftModel.from_pretrained(fresh.unet, str(folder / "unet"))
        PeftModel.from_pretrained(fresh.text_encoder, str(folder / "text_encoder"))
    assert [m for m in messages if "gradient_checkpointing" not in m] == []
    base = build_tiny_sd1(seed=0)
    for got, trained, base_out in zip(_outputs(fresh.unet, fresh.text_encoder), _outputs(parts.unet, parts.text_encoder),
                                      _outputs(base.unet, base.text_encoder), strict=True):
        effect = (trained - base_out).abs().max().item()
        assert effect > 0.1
        torch.testing.assert_close(got, trained, rtol=0, atol=1e-5 * effect)
    # diffusers: the folder itself, no warning, the same outputs as a hand merge of the kohya file
    _assert_loads_like_hand_merge(tiny_sd1_dir, folder, kohya, parts, network)


def test_our_reader_takes_the_folder_and_its_adapter_files(tmp_path):
    _, modules, kohya, folder = _export(tmp_path)
    want = {name: m.delta_weight() for name, m in read_lora_file(kohya).modules.items()}
    for path, count in [(folder, 60), (folder / "unet" / PEFT_WEIGHTS, 48), (folder / "text_encoder", 12),
                        (folder / DIFFUSERS_WEIGHTS, 60)]:
        file = read_lora_file(path)
        assert file.style == "peft" and len(file.modules) == count, path
        for name, module in file.modules.items():
            torch.testing.assert_close(module.delta_weight(), want[name], atol=1e-6, rtol=0)
    # without its config (an upload of the weights file alone) the strength is unknown: refused, not guessed
    alone = tmp_path / "adapter_model.safetensors"
    alone.write_bytes((folder / "unet" / PEFT_WEIGHTS).read_bytes())
    with pytest.raises(LoraFileError, match="without its adapter_config.json"):
        read_lora_file(alone)
    with pytest.raises(LoraFileError, match="holds no PEFT adapter"):
        read_lora_file(tmp_path)


def test_a_ui_listing_finds_exactly_one_lora_per_run(tiny_sd1_dir, image_folder, tmp_path):
    out = tmp_path / "loras"
    out.mkdir()
    old_trap = out / "lora.peft.safetensors"  # what --export-peft wrote before: ss_* keys next to PEFT keys
    parts, _ = _trained_tiny(NETWORK)
    save_peft_lora(_export_modules(parts, NETWORK), old_trap, metadata=build_metadata(_info()))
    assert ui_readers.ui_lora_listing(out) == [old_trap]
    config = resolve_config("character", overrides=dict(
        base=str(tiny_sd1_dir), data=str(image_folder), output=str(out / "lora.safetensors"), rank=2, alpha=1,
        steps=2, seed=3, sample_every=2, sample_steps=1, sample_prompts=["zxq, portrait", "zxq, far"], trigger="zxq",
        export_peft=True, export_dtype="fp32"))
    events = list(train(config))
    finished, samples = events[-1], [e for e in events if isinstance(e, SamplesMade)]
    assert isinstance(finished, RunFinished)
    lora = finished.output
    assert set(finished.extra_outputs) == {out / "lora-peft", json_path(lora), preview_path(lora)}
    assert ui_readers.ui_lora_listing(out) == [lora]  # the PEFT folder and the run folder hold no "LoRA"
    assert not old_trap.exists()
    # A1111's card: the trigger on click, the last sample of the first prompt as its picture
    assert ui_readers.card_prompt(lora, ui_readers.read_metadata(lora)) == "<lora:lora:1.0> zxq"
    assert ui_readers.card_preview(lora).read_bytes() == samples[-1].paths[0].read_bytes()
    assert ui_readers.user_metadata(lora)["sd version"] == "SD1"
    # the PEFT folder holds the run's weights
    exported = read_lora_file(lora).modules
    for name, module in read_lora_file(out / "lora-peft").modules.items():
        torch.testing.assert_close(module.delta_weight(), exported[name].delta_weight(), atol=1e-6, rtol=0)


def test_without_sidecars_and_peft_only_the_lora_is_written(tiny_sd1_dir, image_folder, tmp_path):
    out = tmp_path / "out"
    config = resolve_config("character", overrides=dict(
        base=str(tiny_sd1_dir), data=str(image_folder), output=str(out / "plain.safetensors"), rank=2, alpha=1,
        steps=1, seed=3, sample_every=1, sample_steps=1, sidecars=False))
    finished = list(train(config))[-1]
    assert finished.extra_outputs == ()
    assert sorted(p.name for p in out.iterdir()) == ["plain.safetensors", "plain_run"]


def test_the_generate_path_takes_the_folder_with_mixed_ranks(tiny_sd1_dir, tmp_path):
    import numpy as np
    from test_generate import SIZE, load_model, pixels, random_modules, write_kohya

    from trainer.generate.generator import Generator
    from trainer.generate.requests import GenerationRequest, LoraSpec

    model = load_model(tiny_sd1_dir)
    modules = random_modules(model, rank=4, alpha=2.0, seed=8, mixed_ranks=True)  # rank_pattern in the config
    kohya = write_kohya(tmp_path / "style.safetensors", modules)
    folder = save_peft_folder(modules, tmp_path / "style-peft", dtype="fp32",
                              models={"unet": model.unet, "text_encoder": model.text_encoder})
    assert json.loads((folder / "unet" / PEFT_CONFIG).read_text())["rank_pattern"]
    generator = Generator(model, fuse=False)
    images = [generator.generate(GenerationRequest("a house", seed=4, loras=(LoraSpec(path, 0.8),), **SIZE))[0]
              for path in (kohya, folder)]
    assert np.array_equal(pixels(images[0].image), pixels(images[1].image))
    assert images[0].infotext.lora_hashes and images[1].infotext.lora_hashes == {}  # A1111 has no hash for a folder


def test_a_failed_rewrite_keeps_the_previous_folder(tmp_path, monkeypatch):
    parts, modules, _, folder = _export(tmp_path)
    before = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    from trainer.lora import peft_folder

    def full_disk(*args, **kwargs):
        raise safetensors.SafetensorError("Error while serializing: No space left on device (os error 28)")

    monkeypatch.setattr(peft_folder.safetensors.torch, "save_file", full_disk)
    with pytest.raises(StudioError, match="disk is full"):
        save_peft_folder(modules, folder, dtype="fp32", models={"unet": parts.unet, "text_encoder": parts.text_encoder})
    assert {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora-peft", "lora.safetensors"]  # no staging left
