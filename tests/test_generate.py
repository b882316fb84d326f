"""Generation with several LoRA files: exact mixing, any file style, refusals, images with infotext.

Every expected weight is computed here from the tensors the test wrote, never through the code
under test; the "effective weight" of a layer is read by pushing the identity through its live
forward, so it covers whatever peft/diffusers actually run (unfused adapters or fused weights).
"""

from __future__ import annotations

import gc
import json
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from peft.tuners.lora import LoraLayer
from safetensors import safe_open

from trainer.config.schema import ModelConfig
from trainer.core.errors import ConfigError, LoraFileError
from trainer.generate.generator import Generator
from trainer.generate.infotext import parse_infotext, read_png_infotext
from trainer.generate.matching import block_multipliers
from trainer.generate.requests import (
    BlockWeights,
    GenerationRequest,
    LoraSpec,
    parse_block_weights,
    parse_lora_arg,
    save_images,
)
from trainer.lora.inject import (
    module_in_out,
    text_encoder_target_modules,
    unet_target_modules,
)
from trainer.lora.metadata import ExportInfo, build_metadata
from trainer.lora.names import kohya_module_name, parse_kohya_module_name
from trainer.lora.reading import LoraModule
from trainer.lora.writing import save_kohya_lora, save_peft_lora
from trainer.models.loading import load_base_model

SIZE = {"width": 64, "height": 64, "steps": 2}


# --- helpers -------------------------------------------------------------------------------------


def load_model(folder: Path):
    return load_base_model(ModelConfig(base=str(folder)))


def lora_layers(model) -> dict[str, tuple[str, str]]:
    """kohya name -> (component, path) of every layer the test LoRAs touch (UNet "full" + TE attn/MLP)."""
    layers = {}
    for component, module, paths in (
        ("unet", model.unet, unet_target_modules(model.unet, "full")),
        ("text_encoder", model.text_encoder, text_encoder_target_modules(model.text_encoder, True)),
    ):
        for path in paths:
            layers[kohya_module_name(component, path, "sd1")] = (component, path)
    return layers


def random_modules(model, rank: int, alpha: float, seed: int, *, only: str = "",
                   mixed_ranks: bool = False) -> list[LoraModule]:
    generator = torch.Generator().manual_seed(seed)
    modules = []
    for index, (name, (component, path)) in enumerate(lora_layers(model).items()):
        if only and component != only:
            continue
        layer = getattr(model, component).get_submodule(path)
        in_features, out_features = module_in_out(layer)
        tail = (1, 1) if isinstance(layer, torch.nn.Conv2d) else ()
        layer_rank = rank + (index % 3 == 0) if mixed_ranks else rank
        down = torch.randn(layer_rank, in_features, *tail, generator=generator) * 0.3
        up = torch.randn(out_features, layer_rank, *tail, generator=generator) * 0.3
        modules.append(LoraModule(name, down, up, alpha))
    return modules


def write_kohya(path: Path, modules: list[LoraModule], **info) -> Path:
    meta = build_metadata(ExportInfo(family="sd1", output_name=path.stem, rank=modules[0].rank,
                                     alpha=modules[0].alpha, **info))
    save_kohya_lora(modules, meta, path, dtype="fp32")
    return path


def component_module(model, component: str, path: str) -> torch.nn.Module:
    return getattr(model, component).get_submodule(path)


def effective_weight(layer: torch.nn.Module) -> torch.Tensor:
    """The weight a layer's forward actually applies (identity in, bias out)."""
    base = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
    with torch.no_grad():
        if isinstance(base, torch.nn.Linear):
            out = layer(torch.eye(base.in_features))
            return (out - (base.bias if base.bias is not None else 0)).T
        channels = base.in_channels
        out = layer(torch.eye(channels).reshape(channels, channels, 1, 1))[:, :, 0, 0]
        return (out - (base.bias if base.bias is not None else 0)).T.reshape(base.weight.shape)


def delta(module: LoraModule) -> torch.Tensor:
    """scale·B·A from the tensors the test wrote (independent of the code under test)."""
    up, down = module.up.double().flatten(1), module.down.double().flatten(1)
    return ((module.alpha / down.shape[0]) * up @ down).float().reshape(module.up.shape[0], *module.down.shape[1:])


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


@pytest.fixture(scope="module")
def two_loras(tmp_path_factory, tiny_sd1_dir):
    folder = tmp_path_factory.mktemp("loras")
    model = load_model(tiny_sd1_dir)
    first = random_modules(model, rank=4, alpha=2.0, seed=1)  # alpha != rank: scale 0.5
    second = random_modules(model, rank=2, alpha=8.0, seed=2, mixed_ranks=True)  # ranks 2 and 3: scale 4 or 8/3
    return (write_kohya(folder / "first.safetensors", first), first,
            write_kohya(folder / "second.safetensors", second), second)


# --- mixing --------------------------------------------------------------------------------------


@pytest.mark.parametrize("fuse", [False, True], ids=["adapters", "fused"])
def test_two_loras_mix_exactly(tiny_sd1_dir, two_loras, fuse: bool) -> None:
    first_path, first, second_path, second = two_loras
    model = load_model(tiny_sd1_dir)
    layers = lora_layers(model)
    base = {name: component_module(model, *where).weight.detach().clone() for name, where in layers.items()}
    generator = Generator(model, fuse=fuse)
    specs = (LoraSpec(first_path, 0.7), LoraSpec(second_path, 0.3))
    generator.prepare(GenerationRequest("x", loras=specs))

    generator.apply(specs)
    for a, b in zip(first, second):
        expected = base[a.name] + 0.7 * delta(a) + 0.3 * delta(b)
        got = effective_weight(component_module(model, *layers[a.name]))
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5, msg=a.name)

    generator.apply((LoraSpec(first_path, -1.0), LoraSpec(second_path, 0.0)))  # negative weights too
    for a in first:
        got = effective_weight(component_module(model, *layers[a.name]))
        torch.testing.assert_close(got, base[a.name] - delta(a), atol=2e-5, rtol=1e-5, msg=a.name)

    generator.apply((LoraSpec(first_path, 0.0), LoraSpec(second_path, 0.0)))
    for name, where in layers.items():
        torch.testing.assert_close(effective_weight(component_module(model, *where)), base[name], atol=2e-6, rtol=0)


def test_fp16_weights_are_restored_bit_exact_after_fusing(tiny_sd1_dir, two_loras) -> None:
    """Unfusing by subtraction drifts in fp16; switching weights back and forth must not."""
    first_path, first, second_path, second = two_loras
    model = load_base_model(ModelConfig(base=str(tiny_sd1_dir)), dtype=torch.float16)
    layers = lora_layers(model)
    base = {name: component_module(model, *where).weight.detach().clone() for name, where in layers.items()}
    generator = Generator(model, fuse=True)
    generator.prepare(GenerationRequest("x", loras=(LoraSpec(first_path), LoraSpec(second_path))))
    for weights in [(0.7, 0.3), (1.3, -0.5), (0.2, 0.9)]:
        generator.apply((LoraSpec(first_path, weights[0]), LoraSpec(second_path, weights[1])))
        for a, b in zip(first, second):
            fused = component_module(model, *layers[a.name]).get_base_layer().weight.float()
            expected = base[a.name].float() + weights[0] * delta(a) + weights[1] * delta(b)
            torch.testing.assert_close(fused, expected, atol=1e-2, rtol=1e-2)
    generator.apply(())
    for name, where in layers.items():
        assert torch.equal(component_module(model, *where).get_base_layer().weight, base[name]), name


def base_weights(model) -> dict[str, torch.Tensor]:
    """Every frozen tensor of the UNet and text encoder by its plain name (peft's wrapping removed)."""
    weights = {}
    for component in ("unet", "text_encoder"):
        for name, tensor in getattr(model, component).state_dict().items():
            if "lora_" not in name:
                weights[f"{component}.{name.replace('base_layer.', '')}"] = tensor.detach().clone()
    return weights


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "packed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_turning_a_kohya_lora_off_leaves_the_base_bit_identical(tiny_sd1_dir, two_loras, fuse: bool,
                                                               dtype: torch.dtype) -> None:
    """The promise of the module docstring, on every path and base precision: on, off, re-weighted,
    removed -- the base weights end exactly as loaded (fused weights are restored, not un-subtracted)."""
    first_path, _, second_path, _ = two_loras
    model = load_base_model(ModelConfig(base=str(tiny_sd1_dir)), dtype=dtype)
    loaded = base_weights(model)
    component, path = next(where for where in lora_layers(model).values()
                           if isinstance(component_module(model, *where), torch.nn.Linear))
    probe = torch.randn(3, component_module(model, component, path).in_features).to(dtype)
    with torch.no_grad():
        plain = component_module(model, component, path)(probe)
    generator = Generator(model, fuse=fuse, device="cpu")
    specs = (LoraSpec(first_path, 0.8), LoraSpec(second_path, -0.4))
    generator.prepare(GenerationRequest("x", loras=specs))
    for weights in [(0.8, -0.4), (1.7, 0.0), (0.3, 1.1)]:
        generator.apply((LoraSpec(first_path, weights[0]), LoraSpec(second_path, weights[1])))
        with torch.no_grad():
            assert not torch.allclose(component_module(model, component, path)(probe), plain, atol=1e-2)  # it is on
    generator.apply((LoraSpec(first_path, 0.8, enabled=False),))
    after_off = base_weights(model)
    assert after_off.keys() == loaded.keys()
    changed = [name for name in loaded if after_off[name].dtype != loaded[name].dtype
               or not torch.equal(after_off[name], loaded[name])]
    assert not changed, f"{len(changed)} base tensors differ after turning the LoRAs off, e.g. {changed[:3]}"
    generator.prepare(GenerationRequest("x"))  # removed altogether: peft unwraps the layers
    assert all(torch.equal(base_weights(model)[name], loaded[name]) for name in loaded)


def test_weight_zero_renders_the_base_image_and_switching_never_reloads(tiny_sd1_dir, two_loras, monkeypatch) -> None:
    first_path, _, _second_path, _ = two_loras
    generator = Generator(load_model(tiny_sd1_dir))
    plain = generator.generate(GenerationRequest("a cat", seed=3, **SIZE))[0]

    import trainer.generate.generator as generate_module
    reads = []
    real_read = generate_module.read_lora_file
    monkeypatch.setattr(generate_module, "read_lora_file", lambda path: reads.append(path) or real_read(path))
    unet = generator.pipe.unet
    zero = generator.generate(GenerationRequest("a cat", seed=3, loras=(LoraSpec(first_path, 0.0),), **SIZE))[0]
    strong = generator.generate(GenerationRequest("a cat", seed=3, loras=(LoraSpec(first_path, 1.5),), **SIZE))[0]
    off = generator.generate(GenerationRequest("a cat", seed=3, loras=(LoraSpec(first_path, 1.5, enabled=False),),
                                               **SIZE))[0]
    assert np.array_equal(pixels(zero.image), pixels(plain.image))
    assert np.array_equal(pixels(off.image), pixels(plain.image))
    assert np.abs(pixels(strong.image) - pixels(plain.image)).mean() > 1.0
    assert reads == [first_path] and generator.pipe.unet is unet  # weights changed, nothing reloaded


def test_a_changed_file_is_reloaded_and_a_removed_one_dropped(tiny_sd1_dir, tmp_path) -> None:
    import os

    model = load_model(tiny_sd1_dir)
    path = write_kohya(tmp_path / "wip.safetensors", random_modules(model, rank=2, alpha=2.0, seed=1, only="unet"))
    next_epoch = random_modules(model, rank=3, alpha=2.0, seed=2, only="unet")
    generator = Generator(model)
    generator.prepare(GenerationRequest("x", loras=(LoraSpec(path),)))
    first_adapter = generator.report(path).adapter
    write_kohya(path, next_epoch)  # training saved a new epoch over it
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10 ** 9))
    generator.prepare(GenerationRequest("x", loras=(LoraSpec(path),)))
    assert generator.report(path).adapter != first_adapter
    assert list(generator.pipe.get_list_adapters()["unet"]) == [generator.report(path).adapter]
    path.unlink()
    assert generator.prepare(GenerationRequest("x")) == [] and generator.pipe.get_list_adapters() == {}


def test_alpha_other_than_rank_gives_the_right_strength(tiny_sd1_dir, tmp_path) -> None:
    """α=1 with r=4 must apply 0.25·B·A (kohya's α/r), not B·A."""
    model = load_model(tiny_sd1_dir)
    modules = random_modules(model, rank=4, alpha=1.0, seed=5)
    path = write_kohya(tmp_path / "alpha1.safetensors", modules)
    layers = lora_layers(model)
    base = {m.name: component_module(model, *layers[m.name]).weight.detach().clone() for m in modules}
    generator = Generator(model)
    spec = LoraSpec(path, 1.0)
    generator.prepare(GenerationRequest("x", loras=(spec,)))
    generator.apply((spec,))
    for module in modules:
        bare = (module.up.flatten(1) @ module.down.flatten(1)).reshape(base[module.name].shape)
        got = effective_weight(component_module(model, *layers[module.name]))
        torch.testing.assert_close(got, base[module.name] + 0.25 * bare, atol=2e-5, rtol=1e-5)


def test_peft_and_kohya_files_of_one_adapter_give_identical_outputs(tiny_sd1_dir, tmp_path) -> None:
    model = load_model(tiny_sd1_dir)
    modules = random_modules(model, rank=4, alpha=2.0, seed=8)
    kohya = write_kohya(tmp_path / "style.safetensors", modules)
    peft = tmp_path / "style.peft.safetensors"
    save_peft_lora(modules, peft, dtype="fp32")
    assert not any(".lora_down." in key for key in json.loads(peft.read_bytes()[8:8 + int.from_bytes(
        peft.read_bytes()[:8], "little")]))  # really the other key style
    generator = Generator(model, fuse=False)
    outputs = []
    for path in (kohya, peft):
        request = GenerationRequest("a house", seed=4, loras=(LoraSpec(path, 0.8),), **SIZE)
        outputs.append(generator.generate(request)[0])
        layer = component_module(model, "unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k")
        outputs.append(effective_weight(layer))
    assert np.array_equal(pixels(outputs[0].image), pixels(outputs[2].image))
    torch.testing.assert_close(outputs[1], outputs[3], atol=1e-6, rtol=0)


@pytest.mark.parametrize("style, dtype, tolerance", [
    ("kohya", "fp16", 2e-3), ("kohya", "bf16", 2e-2), ("peft", "fp16", 2e-3), ("diffusers-old", "fp32", 2e-5),
])
def test_every_file_style_and_dtype_applies_the_same_update(tiny_sd1_dir, tmp_path, style, dtype, tolerance) -> None:
    from safetensors.torch import save_file

    model = load_model(tiny_sd1_dir)
    attention = [m for m in random_modules(model, rank=4, alpha=4.0, seed=9, only="unet") if "_attn" in m.name]
    layers = lora_layers(model)
    path = tmp_path / f"{style}-{dtype}.safetensors"
    if style == "kohya":
        save_kohya_lora(attention, {}, path, dtype=dtype)
    elif style == "peft":
        save_peft_lora(attention, path, dtype=dtype)
    else:  # diffusers < 0.21 attention-processor keys, no alpha (scale 1)
        tensors = {}
        for m in attention:
            block, _, proj = layers[m.name][1].rpartition(".")
            proj = "to_out" if proj == "0" else proj
            block = block.removesuffix(".to_out")
            tensors[f"unet.{block}.processor.{proj}_lora.down.weight"] = m.down.contiguous()
            tensors[f"unet.{block}.processor.{proj}_lora.up.weight"] = m.up.contiguous()
        save_file(tensors, str(path))
    base = {m.name: component_module(model, *layers[m.name]).weight.detach().clone() for m in attention}
    generator = Generator(model)
    spec = LoraSpec(path, 0.5)
    generator.prepare(GenerationRequest("x", loras=(spec,)))
    assert generator.report(path).layers == len(attention) and generator.report(path).style == style
    generator.apply((spec,))
    for m in attention:
        got = effective_weight(component_module(model, *layers[m.name]))
        torch.testing.assert_close(got, base[m.name] + 0.5 * delta(m), atol=tolerance, rtol=tolerance, msg=m.name)


# --- unfused: all enabled LoRAs packed into one low-rank product per layer ----------------------


def partial_locon(model, seed: int) -> list[LoraModule]:
    """Rank 5, alpha 2.5, on a few layers only: cross-attention of the UNet and two 3x3 resnet convs (LoCon)."""
    generator = torch.Generator().manual_seed(seed)
    modules = [m for m in random_modules(model, rank=5, alpha=2.5, seed=seed, only="unet") if "attn2" in m.name]
    for path in ("down_blocks.0.resnets.0.conv1", "up_blocks.1.resnets.0.conv2"):
        conv = model.unet.get_submodule(path)
        down = torch.randn(5, conv.in_channels, 3, 3, generator=generator) * 0.1
        up = torch.randn(conv.out_channels, 5, 1, 1, generator=generator) * 0.3
        modules.append(LoraModule(kohya_module_name("unet", path, "sd1"), down, up, 2.5))
    return modules


def expected_factor(spec: LoraSpec, component: str, path: str) -> float:
    """The spec's multiplier for one layer, from its fields (down/mid/up block weights only)."""
    if component == "text_encoder":
        return spec.te
    half = {"down_blocks": spec.blocks.down, "mid_block": spec.blocks.mid, "up_blocks": spec.blocks.up}
    return spec.unet * half.get(path.split(".")[0], 1.0)


def expected_weights(model, loras: list[tuple[LoraSpec, list[LoraModule]]]) -> dict[tuple[str, str], torch.Tensor]:
    """(component, path) -> W0 + sum_i w_i * (alpha_i / r_i) * B_i A_i, from the tensors the test wrote."""
    weights: dict[tuple[str, str], torch.Tensor] = {}
    for spec, modules in loras:
        for module in modules:
            where = parse_kohya_module_name(module.name)
            if where not in weights:
                weights[where] = component_module(model, *where).weight.detach().clone()
            weights[where] += expected_factor(spec, *where) * delta(module)
    return weights


def assert_layers_apply(model, weights: dict[tuple[str, str], torch.Tensor], atol: float = 2e-5) -> None:
    """Each layer's live forward on a random input equals the plain op with the expected weight."""
    generator = torch.Generator().manual_seed(0)
    for (component, path), weight in weights.items():
        layer = component_module(model, component, path)
        base = layer.get_base_layer()
        with torch.no_grad():
            if isinstance(base, torch.nn.Linear):
                x = torch.randn(2, 3, base.in_features, generator=generator)
                expected = torch.nn.functional.linear(x, weight, base.bias)
            else:
                x = torch.randn(2, base.in_channels, 5, 5, generator=generator)
                expected = torch.nn.functional.conv2d(x, weight, base.bias, base.stride, base.padding)
            torch.testing.assert_close(layer(x), expected, atol=atol, rtol=1e-5, msg=f"{component}.{path}")


def unet_prediction(unet) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    config = unet.config
    latents = torch.randn(2, config.in_channels, 16, 16, generator=generator)
    context = torch.randn(2, 7, config.cross_attention_dim, generator=generator)
    with torch.inference_mode():
        return unet(latents, 500, encoder_hidden_states=context).sample


def forward_hooks(model) -> int:
    return sum(len(layer._forward_hooks) for module in (model.unet, model.text_encoder) for layer in module.modules())


@pytest.fixture(scope="module")
def partial_lora(tmp_path_factory, tiny_sd1_dir):
    modules = partial_locon(load_model(tiny_sd1_dir), seed=3)
    return write_kohya(tmp_path_factory.mktemp("partial") / "partial.safetensors", modules), modules


@pytest.mark.parametrize("count", [2, 3])
def test_unfused_loras_are_packed_and_mix_exactly(tiny_sd1_dir, two_loras, partial_lora, count: int) -> None:
    """Ranks 4, 2-3 and 5 (the last on a few layers incl. 3x3 convs), TE/UNet split and block weights."""
    first_path, first, second_path, second = two_loras
    model = load_model(tiny_sd1_dir)
    specs = [LoraSpec(first_path, 0.7, te_weight=0.2, blocks=BlockWeights(down=0.5, mid=1.0, up=-0.25)),
             LoraSpec(second_path, 0.3, unet_weight=-0.6),
             LoraSpec(partial_lora[0], 1.1, blocks=BlockWeights(down=0.0, mid=2.0, up=1.0))][:count]
    modules = [first, second, partial_lora[1]][:count]
    expected = expected_weights(model, list(zip(specs, modules)))
    reference = load_model(tiny_sd1_dir).unet  # the same base with the expected weights written in
    for (component, path), weight in expected.items():
        if component == "unet":
            reference.get_submodule(path).weight.data.copy_(weight)
    generator = Generator(model, fuse=False)
    generator.prepare(GenerationRequest("x", loras=tuple(specs)))
    generator.apply(specs)

    assert_layers_apply(model, expected)
    # Through the whole UNet fp32 rounding grows to ~2e-4 (peft's per-adapter forward lands as far
    # from the reference); a wrong factor on any one layer moves the prediction by far more.
    plain = unet_prediction(load_model(tiny_sd1_dir).unet)
    wanted = unet_prediction(reference)
    assert (wanted - plain).abs().max() > 0.05
    torch.testing.assert_close(unet_prediction(model.unet), wanted, atol=5e-4, rtol=0)
    # Really packed: peft's per-adapter forward is off in every adapted layer; one hook runs where
    # some factor is not 0 (the partial LoRA's 3x3 conv in a down block has weight 0: no hook).
    factors = [(parse_kohya_module_name(m.name), expected_factor(spec, *parse_kohya_module_name(m.name)))
               for spec, group in zip(specs, modules) for m in group]
    live = {where for where, factor in factors if factor != 0}
    for component, path in expected:
        layer = component_module(model, component, path)
        assert layer.disable_adapters and len(layer._forward_hooks) == ((component, path) in live), path
    assert forward_hooks(model) == len(live) and (count < 3 or len(live) < len(expected))


def test_unfused_weight_changes_repack_and_removing_every_lora_restores_the_base(tiny_sd1_dir, two_loras) -> None:
    first_path, first, second_path, second = two_loras
    model = load_model(tiny_sd1_dir)
    plain = unet_prediction(model.unet)
    generator = Generator(model, fuse=False)
    fused = Generator(load_model(tiny_sd1_dir), fuse=True)  # peft's own merge as a second opinion
    request = GenerationRequest("a cat", seed=5, loras=(LoraSpec(first_path, 0.7), LoraSpec(second_path, 0.3)), **SIZE)
    images = [g.generate(request)[0] for g in (generator, fused)]
    assert np.abs(pixels(images[0].image) - pixels(images[1].image)).max() <= 1

    packed_up = weakref.ref(next(hook.up for layer in model.unet.modules() for hook in layer._forward_hooks.values()))
    for weights in [(-0.5, 1.2), (0.0, 0.4), (0.7, 0.3)]:  # after generating: every change is applied
        specs = (LoraSpec(first_path, weights[0]), LoraSpec(second_path, weights[1]))
        generator.generate(GenerationRequest("a cat", seed=5, loras=specs, **SIZE))
        assert_layers_apply(model, expected_weights(model, list(zip(specs, (first, second)))))
    gc.collect()
    assert packed_up() is None  # the first packing was let go, not kept beside the new one

    generator.apply(())  # LoRAs off, files still loaded: the base exactly, no hook left running
    assert torch.equal(unet_prediction(model.unet), plain) and forward_hooks(model) == 0
    generator.apply(specs)  # and on again, as compare mode switches them
    assert_layers_apply(model, expected_weights(model, list(zip(specs, (first, second)))))
    generator.prepare(GenerationRequest("x"))  # every file removed
    assert torch.equal(unet_prediction(model.unet), plain) and forward_hooks(model) == 0
    assert generator.pipe.get_list_adapters() == {}
    assert not any(layer.lora_A for module in (model.unet, model.text_encoder) for layer in module.modules()
                   if isinstance(layer, LoraLayer))


# --- text-encoder/UNet split and block weights ---------------------------------------------------


def test_te_unet_split_and_block_weights(tiny_sd1_dir, two_loras) -> None:
    first_path, first, _, _ = two_loras
    model = load_model(tiny_sd1_dir)
    layers = lora_layers(model)
    base = {name: component_module(model, *where).weight.detach().clone() for name, where in layers.items()}
    generator = Generator(model)
    blocks = BlockWeights(down=0.0, mid=1.0, up=0.5)
    spec = LoraSpec(first_path, 0.8, te_weight=0.0, blocks=blocks)
    generator.prepare(GenerationRequest("x", loras=(spec,)))
    generator.apply((spec,))
    expected_factor = {"down_blocks": 0.0, "mid_block": 0.8, "up_blocks": 0.4, "text_encoder": 0.0}
    for module in first:
        component, path = layers[module.name]
        factor = expected_factor["text_encoder" if component == "text_encoder" else path.split(".")[0]]
        got = effective_weight(component_module(model, component, path))
        torch.testing.assert_close(got, base[module.name] + factor * delta(module), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("text, expected", [
    ("down=0,mid=1,up=0.5", BlockWeights(0.0, 1.0, 0.5)),
    ("OUTALL", BlockWeights(vector=(1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1))),
    ("1,0,1,0.5,0.25", BlockWeights(vector=(1, 0, 1, 0.5, 0.25))),
])
def test_parse_block_weights(text: str, expected: BlockWeights) -> None:
    assert parse_block_weights(text) == expected


def test_lbw_vector_maps_to_the_tiny_unets_transformers(tiny_sd1_dir) -> None:
    unet = load_model(tiny_sd1_dir).unet  # transformers: down 0.0 | mid | up 1.0, 1.1 -> 5 LBW values
    multiplier = block_multipliers(unet, parse_block_weights("1,0.1,0.2,0.3,0.4"))
    assert multiplier("down_blocks.0.attentions.0.proj_in") == 0.1
    assert multiplier("mid_block.attentions.0.transformer_blocks.0.attn2.to_k") == 0.2
    assert multiplier("up_blocks.1.attentions.1.proj_out") == 0.4
    assert multiplier("up_blocks.1.resnets.0.conv1") == 0.3  # a LoCon resnet follows its layer's transformer
    assert multiplier("conv_in") == 1.0
    with pytest.raises(ConfigError, match="need 5 values"):
        block_multipliers(unet, parse_block_weights("OUTALL"))


# --- refusals and reports ------------------------------------------------------------------------


def test_lora_for_another_family_is_refused_and_nothing_is_loaded(tiny_sd1_dir, tmp_path) -> None:
    sdxl = tmp_path / "xl.safetensors"
    save_kohya_lora([LoraModule("lora_te2_text_model_encoder_layers_0_self_attn_q_proj",
                                torch.randn(4, 1280), torch.randn(1280, 4), 4.0)], {}, sdxl, dtype="fp32")
    misfit = tmp_path / "sd15-real.safetensors"  # an SD1.5-sized LoRA: family fits, shapes do not
    save_kohya_lora([LoraModule("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k",
                                torch.randn(4, 768), torch.randn(320, 4), 4.0)], {}, misfit, dtype="fp32")
    generator = Generator(load_model(tiny_sd1_dir))
    with pytest.raises(LoraFileError, match="made for SDXL but the loaded model is SD 1.x"):
        generator.prepare(GenerationRequest("x", loras=(LoraSpec(sdxl),)))
    with pytest.raises(LoraFileError, match=r"does not fit this model: .*attn2_to_k is 768 -> 320 .* 32 -> 32"):
        generator.prepare(GenerationRequest("x", loras=(LoraSpec(misfit),)))
    assert generator.pipe.get_list_adapters() == {}


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_pickle_is_refused(tiny_sd1_dir, tmp_path, suffix: str) -> None:
    path = tmp_path / f"evil{suffix}"
    torch.save({"lora_unet_x.lora_down.weight": torch.zeros(1, 1)}, path)
    generator = Generator(load_model(tiny_sd1_dir))
    with pytest.raises(LoraFileError, match="pickle") as error:
        generator.prepare(GenerationRequest("x", loras=(LoraSpec(path),)))
    assert "safetensors" in str(error.value)


def test_keys_that_match_nothing_are_reported(tiny_sd1_dir, tmp_path) -> None:
    model = load_model(tiny_sd1_dir)
    modules = random_modules(model, rank=2, alpha=2.0, seed=3, only="unet")
    ghost = LoraModule("lora_unet_down_blocks_3_attentions_0_proj_in", torch.randn(2, 64, 1, 1), torch.randn(64, 2, 1, 1), 2.0)
    path = write_kohya(tmp_path / "extra.safetensors", [*modules, ghost])
    generator = Generator(model)
    notes = generator.prepare(GenerationRequest("x <lora:missing:1>", loras=(LoraSpec(path),)))
    assert generator.report(path).unmatched == (ghost.name,)
    assert generator.report(path).layers == len(modules)
    assert any(f"1 of {len(modules) + 1} layers match nothing" in n and ghost.name in n for n in notes)
    assert any("<lora:missing>" in n for n in notes)
    only_ghost = write_kohya(tmp_path / "ghost.safetensors", [ghost])
    with pytest.raises(LoraFileError, match="None of the 1 layers"):
        generator.prepare(GenerationRequest("x", loras=(LoraSpec(only_ghost),)))


@pytest.mark.parametrize("fields, message", [
    ({"width": 60}, "width 60 is not a multiple of 8"),
    ({"height": 100}, "Use 96 or 104"),
    ({"width": 7}, r"Use 8 \(or another multiple of 8\)\.$"),  # not "Use 8 or 8": 0 is no width
    ({"height": 100000}, r"height 100000 is larger than 4096 px.*Render at the model's size \(64×64\)"),
])
def test_size_must_fit_the_model(tiny_sd1_dir, fields: dict, message: str) -> None:
    generator = Generator(load_model(tiny_sd1_dir))
    with pytest.raises(ConfigError, match=message):
        generator.prepare(GenerationRequest("x", **{**SIZE, **fields}))  # before any image work


@pytest.mark.parametrize("fields, message", [
    ({"steps": 0}, "steps must be at least 1"),
    ({"batch_count": 0}, "batch count"),
    ({"scheduler": "Euler a Karras"}, "no Karras schedule"),
    ({"loras": (LoraSpec("a.safetensors"), LoraSpec("./a.safetensors"))}, "listed twice"),
])
def test_request_is_validated(fields: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        GenerationRequest("x", **fields)


@pytest.mark.parametrize("text, expected", [
    ("mychar.safetensors:0.8", LoraSpec("mychar.safetensors", 0.8)),
    ("mychar.safetensors", LoraSpec("mychar.safetensors", 1.0)),
    ("dir/a.safetensors:-0.5", LoraSpec("dir/a.safetensors", -0.5)),
    ("C:/loras/a.safetensors:1:0.2:0.9", LoraSpec("C:/loras/a.safetensors", 1.0, 0.2, 0.9)),
])
def test_parse_lora_arg(text: str, expected: LoraSpec) -> None:
    assert parse_lora_arg(text) == expected


@pytest.mark.parametrize("text, message", [
    ("a.safetensors:abc", r"--lora a.safetensors:abc: the weight 'abc' is not a number"),
    ("a.safetensors:1:2", r"give FILE:WEIGHT or FILE:WEIGHT:TE:UNET"),
    ("a.safetensors:1:2:3:4", r"--lora a.safetensors:1:2:3:4: too many numbers"),  # not "the weight '1'"
])
def test_a_bad_lora_arg_says_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_lora_arg(text)


# --- images and infotext -------------------------------------------------------------------------


def test_batch_with_comparison_writes_a1111_pngs(tiny_sd1_dir, two_loras, tmp_path) -> None:
    first_path, _, second_path, _ = two_loras
    generator = Generator(load_model(tiny_sd1_dir))
    request = GenerationRequest("zxq girl reading", negative_prompt="blurry", seed=7, batch_count=2, cfg_scale=6.5,
                                scheduler="Euler a", compare_without_loras=True,
                                loras=(LoraSpec(first_path, 0.8), LoraSpec(second_path, 0.4, 0.2, 0.6)), **SIZE)
    images = generator.generate(request)
    assert [(i.seed, i.loras_on) for i in images] == [(7, True), (7, False), (8, True), (8, False)]
    plain = generator.generate(GenerationRequest("zxq girl reading", negative_prompt="blurry", seed=8, cfg_scale=6.5,
                                                 scheduler="Euler a", **SIZE))[0]
    assert np.array_equal(pixels(images[3].image), pixels(plain.image))  # "off" is the plain model, same seed
    assert not np.array_equal(pixels(images[2].image), pixels(plain.image))

    paths = save_images(images, tmp_path / "out")
    assert [p.name for p in paths] == ["00000-7.png", "00001-7-nolora.png", "00002-8.png", "00003-8-nolora.png"]
    info = parse_infotext(read_png_infotext(paths[2]))
    assert info.prompt == "zxq girl reading <lora:first:0.8> <lora:second:0.2:0.6>"
    assert (info.negative_prompt, info.seed, info.steps, info.cfg_scale) == ("blurry", 8, 2, 6.5)
    assert (info.sampler, info.width, info.height, info.model) == ("Euler a", 64, 64, "tiny-sd1")
    assert set(info.lora_hashes) == {"first", "second"} and all(len(h) == 12 for h in info.lora_hashes.values())
    off = parse_infotext(read_png_infotext(paths[3]))
    assert off.prompt == "zxq girl reading" and off.lora_hashes == {}
    with safe_open(str(first_path), "pt") as fh:
        assert info.lora_hashes["first"] == fh.metadata()["sshs_model_hash"][:12]  # A1111's LoRA hash
    assert save_images(images[:1], tmp_path / "out")[0].name == "00004-7.png"  # numbering continues


def test_cli_generate_writes_pngs(tiny_sd1_dir, two_loras, tmp_path, capsys) -> None:
    from trainer.cli.main import main

    first_path = two_loras[0]
    code = main(["generate", "--base", str(tiny_sd1_dir), "--lora", f"{first_path}:0.8", "--prompt", "zxq girl",
                 "--negative", "blurry", "--seed", "7", "--steps", "2", "--cfg", "5", "-n", "1", "--width", "64",
                 "--height", "64", "--scheduler", "DDIM", "--out", str(tmp_path / "out")])
    assert code == 0
    written = sorted((tmp_path / "out").glob("*.png"))
    assert [p.name for p in written] == ["00000-7.png"] and str(written[0]) in capsys.readouterr().out
    info = parse_infotext(read_png_infotext(written[0]))
    assert (info.prompt, info.sampler, info.cfg_scale, info.seed) == ("zxq girl <lora:first:0.8>", "DDIM", 5.0, 7)
