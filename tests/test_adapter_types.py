"""Adapter types (lora, dora, locon, loha, lokr) and per-block ranks on the tiny SD1 model.

Each type is injected with peft, given random weights, exported; the file's keys and shapes must
follow the peer convention (kohya / LyCORIS, checked by the re-implemented A1111 and ComfyUI
readers in tests/peer_loaders.py), the size planned before training must be the file's, and our
Generate must give the trained model's UNet and text-encoder outputs from the file.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peer_loaders import a1111_delta, comfy_delta
from safetensors import safe_open
from safetensors.torch import load_file
from tiny_runs import sd_outputs

from trainer.config.schema import ModelConfig, NetworkConfig
from trainer.core.errors import ConfigError, LoraFileError
from trainer.generate.generator import Generator
from trainer.generate.requests import GenerationRequest, LoraSpec
from trainer.lora.adapters import block_index, block_names
from trainer.lora.inject import inject_lora, lora_layers, lora_parameters, plan_lora
from trainer.lora.metadata import ExportInfo, build_metadata, network_type_args
from trainer.lora.reading import read_lora_file
from trainer.lora.sizing import architecture_for, lora_size
from trainer.lora.writing import collect_lora_modules, save_kohya_lora
from trainer.models.loading import load_base_model

TYPES = ("lora", "dora", "locon", "loha", "lokr")
# The tensor suffixes of one layer, as A1111/ComfyUI expect them per type.
SUFFIXES = {
    "lora": {"lora_down.weight", "lora_up.weight", "alpha"},
    "dora": {"lora_down.weight", "lora_up.weight", "alpha", "dora_scale"},
    "locon": {"lora_down.weight", "lora_up.weight", "alpha"},
    "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"},
    "lokr": {"lokr_w1", "lokr_w2", "alpha"},  # small layers: peft keeps w2 full at rank 4
}
LOKR_LOW_RANK = {"lokr_w1", "lokr_w2_a", "lokr_w2_b", "alpha"}  # wider layers: w2 = w2_a @ w2_b
NETWORK_MODULE = {"lora": "networks.lora", "locon": "networks.lora", "dora": "lycoris.kohya",
                  "loha": "lycoris.kohya", "lokr": "lycoris.kohya"}


def _model(folder: Path):
    return load_base_model(ModelConfig(base=str(folder)), dtype=torch.float32)


def _trained(folder: Path, network: NetworkConfig, seed: int = 0):
    """The tiny model with ``network`` injected and every adapter weight random (a 'trained' state)."""
    model = _model(folder)
    encoders = {"text_encoder": model.text_encoder}
    plan = plan_lora(network, model.unet, encoders)
    parts = {name: m for name, m in (("unet", model.unet), ("text_encoder", model.text_encoder))
             if name in plan.modules}
    g = torch.Generator().manual_seed(seed)
    for name, module in parts.items():
        inject_lora(module, plan.modules[name], network, plan.ranks.get(name))
        with torch.no_grad():
            for param in lora_parameters(module):
                noise = torch.randn(param.shape, generator=g) * 0.2
                param.copy_(param * (1 + noise) if "magnitude" in _param_name(module, param) else noise)
        module.eval()
    return model, plan, parts


def _param_name(module, param) -> str:
    return next(n for n, p in module.named_parameters() if p is param)


def _export(model, parts, path: Path, network: NetworkConfig) -> int:
    modules = [m for name, part in parts.items() for m in collect_lora_modules(name, part, "sd1")]
    info = ExportInfo(family="sd1", output_name=path.stem, rank=network.rank, alpha=network.alpha,
                      network_args=network_type_args(network.network, network.conv_rank or network.rank,
                                                     network.conv_alpha or network.alpha, network.block_dims))
    return save_kohya_lora(modules, build_metadata(info), path, dtype="fp32")


@pytest.fixture(scope="module")
def exported(tiny_sd1_dir: Path, tmp_path_factory) -> dict:
    """type -> (file, reference UNet/TE outputs of the model that was exported, network config)."""
    folder = tmp_path_factory.mktemp("adapters")
    out = {}
    for kind in TYPES:
        network = NetworkConfig(rank=4, alpha=2.0, targets="full", network=kind)
        model, _plan, parts = _trained(tiny_sd1_dir, network)
        reference = sd_outputs(model.unet, model.text_encoder, pad_id=49407)
        path = folder / f"{kind}.safetensors"
        written = _export(model, parts, path, network)
        out[kind] = (path, reference, network, written, model)
    return out


@pytest.mark.parametrize("kind", TYPES)
def test_keys_shapes_and_metadata_follow_the_peer_convention(exported, kind: str) -> None:
    path, _, _, _, _ = exported[kind]
    tensors = load_file(str(path))
    stems: dict[str, set[str]] = {}
    for key in tensors:
        stem, _, suffix = key.partition(".")
        stems.setdefault(stem, set()).add(suffix)
    assert all(s.startswith(("lora_unet_", "lora_te_")) for s in stems)
    expected = {frozenset(SUFFIXES[kind])} | ({frozenset(LOKR_LOW_RANK)} if kind == "lokr" else set())
    assert {frozenset(v) for v in stems.values()} == expected
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    args = json.loads(meta["ss_network_args"])
    assert meta["ss_network_module"] == NETWORK_MODULE[kind]
    if kind in ("loha", "lokr"):
        assert args["algo"] == kind
    if kind == "dora":
        assert (args["algo"], args["dora_wd"]) == ("lora", "True")
        out = tensors["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_q.lora_up.weight"].shape[0]
        assert tensors["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_q.dora_scale"].shape == (out, 1)
    if kind == "locon":
        assert (args["conv_dim"], args["conv_alpha"]) == ("4", "2.0")
        conv = [s for s in stems if s.endswith(("_conv1", "_conv2", "_conv"))]
        assert conv and all(tensors[f"{s}.lora_down.weight"].shape[2:] == (3, 3) for s in conv)
        assert all(tensors[f"{s}.lora_up.weight"].shape[2:] == (1, 1) for s in conv)
    assert read_lora_file(path).network_type == kind


@pytest.mark.parametrize("kind", TYPES)
def test_the_planned_size_is_the_written_size(tiny_sd1_dir, exported, kind: str) -> None:
    path, _, network, written, _ = exported[kind]
    from trainer.lora.writing import lora_file_size, lora_shapes

    arch = architecture_for(str(tiny_sd1_dir))
    plan = plan_lora(network, arch.unet, arch.text_encoders)
    shape_kind = {"locon": "lora"}.get(kind, kind)
    shapes = [s for c, paths in plan.modules.items() for s in lora_shapes(
        c, {"unet": arch.unet, **arch.text_encoders}[c], paths, "sd1", shape_kind, plan.ranks.get(c))]
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert lora_file_size(shapes, 4, "fp32", alpha=2.0, metadata=meta) == written == path.stat().st_size
    modules, estimate = lora_size(network, arch, "fp32")
    assert modules == len(read_lora_file(path).modules) and abs(estimate - written) < 600


@pytest.mark.parametrize("fuse", [False, True], ids=["packed", "fused"])
@pytest.mark.parametrize("kind", TYPES)
def test_generate_reproduces_the_trained_model_from_the_file(tiny_sd1_dir, exported, kind: str, fuse: bool) -> None:
    path, (unet_ref, te_ref), _, _, _ = exported[kind]
    model = _model(tiny_sd1_dir)
    base_unet, _ = sd_outputs(model.unet, model.text_encoder, pad_id=49407)
    generator = Generator(model, device="cpu", fuse=fuse)
    specs = (LoraSpec(path, 1.0),)
    generator.prepare(GenerationRequest("x", loras=specs))
    generator.apply(specs)
    unet_out, te_out = sd_outputs(model.unet, model.text_encoder, pad_id=49407)
    assert (unet_ref - base_unet).abs().max() > 1e-2  # the adapter changes the output
    torch.testing.assert_close(unet_out, unet_ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(te_out, te_ref, atol=2e-5, rtol=1e-4)
    assert generator.report(path).network_type == kind


@pytest.mark.parametrize("kind", ["lora", "locon", "loha", "lokr", "dora"])
def test_a1111_and_comfyui_readers_apply_the_trained_update(exported, kind: str) -> None:
    """The peers' per-layer ΔW from the file (our re-implementation of their math) is the trained one."""
    path, _, _, _, model = exported[kind]
    tensors = load_file(str(path))
    layers = lora_layers(model.unet)
    checked = 0
    for module_path, layer in layers.items():
        stem = "lora_unet_" + module_path.replace(".", "_")
        base = layer.get_base_layer().weight.detach().float()
        trained = _effective_weight(layer) - base
        for reader in (a1111_delta, comfy_delta):
            got = reader(tensors, stem, base)
            if kind == "dora" and reader is a1111_delta:
                assert got is None  # A1111 1.10 normalises over the input axis only: it cannot read wd_on_out
                continue
            if kind == "dora":
                # ComfyUI/Forge read the [out, 1] dora_scale as the output axis (as trained) but divide by
                # the rows' norm of W0, not of W0 + s·BA: their weight is ours times ‖W0 + s·BA‖ / ‖W0‖ per row.
                up = tensors[f"{stem}.lora_up.weight"].flatten(1)
                down = tensors[f"{stem}.lora_down.weight"].flatten(1)
                merged = base + (tensors[f"{stem}.alpha"] / down.shape[0] * up @ down).reshape(base.shape)
                row = lambda w: w.flatten(1).norm(dim=1).reshape(-1, *[1] * (w.dim() - 1))
                torch.testing.assert_close((got + base) * row(base), (trained + base) * row(merged),
                                           atol=1e-4, rtol=1e-4, msg=stem)
                continue
            torch.testing.assert_close(got, trained, atol=1e-5, rtol=1e-4, msg=f"{reader.__name__} {stem}")
        checked += 1
    assert checked == len(read_lora_file(path).modules) - sum(1 for n in tensors if n.startswith("lora_te_")
                                                              and n.endswith(".alpha"))


def _effective_weight(layer) -> torch.Tensor:
    """W0 + ΔW of a peft layer, as peft's own merge computes it (on a copy)."""
    import copy

    merged = copy.deepcopy(layer)
    merged.merge()
    return merged.get_base_layer().weight.detach().float()


# --- tools ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["dora", "loha", "lokr"])
def test_resize_and_merge_refuse_types_svd_cannot_shrink(exported, tmp_path, kind: str) -> None:
    from trainer.tools.resize import merge_loras, resize_lora

    path = exported[kind][0]
    with pytest.raises(LoraFileError, match=kind if kind != "dora" else "DoRA"):
        resize_lora(path, tmp_path / "small.safetensors", rank=2)
    with pytest.raises(LoraFileError):
        merge_loras([(path, 1.0), (exported["lora"][0], 1.0)], tmp_path / "merged.safetensors")


@pytest.mark.parametrize("kind", TYPES)
def test_inspect_shows_the_type(exported, kind: str) -> None:
    from trainer.tools.inspect import inspect_lora

    report = inspect_lora(exported[kind][0])
    assert report.network_type == kind
    stored = sum(t.numel() for k, t in load_file(str(exported[kind][0])).items() if not k.endswith(".alpha"))
    assert report.parameters == stored
    assert f"{kind} " in report.text().split("\n")[0].lower()
    assert all(s.norm > 0 for s in report.layers)


def test_bake_adds_every_type(tiny_sd1_dir, exported, tmp_path) -> None:
    from trainer.tools.bake import add_lora_to_weights

    for kind in ("dora", "loha", "lokr", "locon"):
        path, (unet_ref, _), _, _, _ = exported[kind]
        model = _model(tiny_sd1_dir)
        add_lora_to_weights(model, LoraSpec(path, 1.0))
        unet_out, _ = sd_outputs(model.unet, model.text_encoder, pad_id=49407)
        torch.testing.assert_close(unet_out, unet_ref, atol=2e-5, rtol=1e-4, msg=kind)


# --- per-block ranks and learning rates ----------------------------------------------------------


@pytest.mark.parametrize("family, path, index, label", [
    ("sd1", "down_blocks.0.attentions.0.proj_in", 1, "IN01"),
    ("sd1", "down_blocks.0.downsamplers.0.conv", 3, "IN03"),
    ("sd1", "down_blocks.1.attentions.1.proj_out", 5, "IN05"),
    ("sd1", "mid_block.attentions.0.proj_in", 12, "MID"),
    ("sd1", "up_blocks.1.attentions.0.proj_in", 16, "OUT03"),
    ("sd1", "up_blocks.3.attentions.2.proj_out", 24, "OUT11"),
    ("sdxl", "down_blocks.1.attentions.0.proj_in", 5, "IN4"),
    ("sdxl", "mid_block.attentions.0.proj_in", 11, "MID1"),
    ("sdxl", "mid_block.resnets.1.conv1", 12, "MID2"),
    ("sdxl", "up_blocks.0.attentions.2.proj_in", 15, "OUT2"),
    ("sd1", "conv_in", -1, None),
])
def test_block_index_is_kohyas(family, path, index, label) -> None:
    assert block_index(path, family) == index
    if label:
        assert block_names(family)[index] == label
    assert len(block_names(family)) == {"sd1": 25, "sdxl": 23}[family]


def test_block_dims_set_ranks_and_drop_blocks(tiny_sd1_dir) -> None:
    dims = ["0"] * 25
    dims[1], dims[12], dims[17] = "8", "2", "6"  # the tiny UNet's transformers sit in IN01, MID, OUT03 and OUT04
    network = NetworkConfig(rank=4, alpha=2.0, targets="full", block_dims=",".join(dims),
                            block_alphas=",".join(["1"] * 25), train_text_encoder=False)
    model, plan, _parts = _trained(tiny_sd1_dir, network)
    ranks = {path: r for path, (r, _) in plan.ranks["unet"].items()}
    assert ranks and {block_index(p, "sd1") for p in ranks} == {1, 12, 17}  # OUT03 (16) left out
    assert {r for p, r in ranks.items() if block_index(p, "sd1") == 1} == {8}
    file_modules = collect_lora_modules("unet", model.unet, "sd1")
    assert {m.rank for m in file_modules} == {8, 2, 6} and {m.alpha for m in file_modules} == {1.0}
    arch = architecture_for(str(tiny_sd1_dir))
    assert lora_size(network, arch)[0] == len(file_modules)


def test_block_lr_multiplies_into_lora_plus(tiny_sd1_dir) -> None:
    from trainer.config.presets import resolve_config
    from trainer.train.optim import lr_multiplier

    lrs = ["1"] * 25
    lrs[1] = "0.5"
    config = resolve_config("character", overrides={"base": str(tiny_sd1_dir), "block_lr": ",".join(lrs),
                                                    "loraplus_ratio": 4.0})
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_{}.lora_studio.weight"
    assert lr_multiplier("unet", name.format("B"), config) == 2.0  # 4 (LoRA+) x 0.5 (IN01)
    assert lr_multiplier("unet", name.format("A"), config) == 0.5
    assert lr_multiplier("unet", name.replace("down_blocks.0", "down_blocks.1").format("A"), config) == 1.0
    assert lr_multiplier("text_encoder", "encoder.layers.0.self_attn.q_proj.lora_A.lora_studio.weight", config) == 1.0


@pytest.mark.parametrize("overrides, field", [
    ({"network": "loha", "rslora": True}, "network.rslora"),
    ({"network": "lokr", "rank_dropout": 0.1}, "network.network"),
    ({"network": "lora", "conv_rank": 4}, "network.conv_rank"),
    ({"block_dims": "4,4,4"}, "network.block_dims"),
    ({"network": "dora", "export_peft": True}, "output.export_peft"),
])
def test_impossible_combinations_are_refused(overrides, field) -> None:
    from trainer.config.presets import resolve_config

    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        resolve_config("character", overrides=overrides)


# --- diffusers -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["lora", "locon"])
def test_diffusers_loads_the_types_it_supports(tiny_sd1_dir, exported, kind: str) -> None:
    """diffusers' load_lora_weights converts kohya LoRA and LoCon (ResNet convs included) for SD pipelines."""
    from tiny_runs import load_pipeline

    path, (unet_ref, te_ref), _, _, _ = exported[kind]
    pipe = load_pipeline(tiny_sd1_dir)
    pipe.load_lora_weights(str(path), adapter_name="file")
    unet_out, te_out = sd_outputs(pipe.unet, pipe.text_encoder, pad_id=49407)
    torch.testing.assert_close(unet_out, unet_ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(te_out, te_ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_diffusers_refuses_lycoris_types_it_cannot_convert(tiny_sd1_dir, exported, kind: str) -> None:
    """What the README's table says: diffusers 0.42's SD pipelines have no LoHa/LoKr converter."""
    from tiny_runs import load_pipeline

    pipe = load_pipeline(tiny_sd1_dir)
    with pytest.raises(ValueError, match="not been correctly renamed"):
        pipe.load_lora_weights(str(exported[kind][0]), adapter_name="file")


def test_diffusers_drops_dora_scale_and_keeps_only_the_lora_part(tiny_sd1_dir, exported, caplog) -> None:
    from tiny_runs import load_pipeline

    path, (unet_ref, _), _, _, _ = exported["dora"]
    pipe = load_pipeline(tiny_sd1_dir)
    pipe.load_lora_weights(str(path), adapter_name="file")
    unet_out, _ = sd_outputs(pipe.unet, pipe.text_encoder, pad_id=49407)
    assert (unet_out - unet_ref).abs().max() > 1e-2  # not the trained DoRA model: use A1111-free Generate/ComfyUI


@pytest.mark.parametrize("path, name", [
    ("down_blocks.0.resnets.1.conv1", "lora_unet_input_blocks_2_0_in_layers_2"),
    ("down_blocks.1.resnets.0.conv_shortcut", "lora_unet_input_blocks_4_0_skip_connection"),
    ("down_blocks.0.downsamplers.0.conv", "lora_unet_input_blocks_3_0_op"),
    ("mid_block.resnets.1.time_emb_proj", "lora_unet_middle_block_2_emb_layers_1"),
    ("up_blocks.2.resnets.2.conv2", "lora_unet_output_blocks_8_0_out_layers_3"),
    ("up_blocks.1.upsamplers.0.conv", "lora_unet_output_blocks_5_2_conv"),
])
def test_sdxl_locon_layers_get_kohyas_sgm_names(path, name) -> None:
    from trainer.lora.names import kohya_module_name, parse_kohya_module_name

    assert kohya_module_name("unet", path, "sdxl") == name
    assert parse_kohya_module_name(name) == ("unet", path)


# --- a real run of each type ----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("kind", TYPES)
def test_a_tiny_run_of_each_type_exports_what_was_planned(tiny_sd1_dir, image_folder, tmp_path, kind: str) -> None:
    from tiny_runs import run_config
    from trainer.lora.writing import lora_file_size, lora_shapes
    from trainer.train.loop import train

    config = run_config(tiny_sd1_dir, image_folder, tmp_path, steps=2, seed=3, network=kind, lr=1e-2,
                        **({"conv_rank": 2, "conv_alpha": 1.0} if kind == "locon" else {}))
    finished = list(train(config))[-1]
    path = Path(config.output.output)
    assert finished.size_bytes == path.stat().st_size
    file = read_lora_file(path)
    assert file.network_type == kind
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == NETWORK_MODULE[kind]
    arch = architecture_for(str(tiny_sd1_dir))
    plan = plan_lora(config.network, arch.unet, arch.text_encoders)
    shape_kind = {"locon": "lora"}.get(kind, kind)
    shapes = [s for c, paths in plan.modules.items() for s in lora_shapes(
        c, {"unet": arch.unet, **arch.text_encoders}[c], paths, "sd1", shape_kind, plan.ranks.get(c))]
    assert lora_file_size(shapes, config.network.rank, "fp16", alpha=config.network.alpha, metadata=meta) \
        == finished.size_bytes
    assert any(m.delta_weight(torch.zeros(m.out_in) if kind == "dora" else None).abs().max() > 0
               for m in file.modules.values() if not hasattr(m, "down") or m.up.abs().max() > 0)


@pytest.mark.parametrize("kind", TYPES)
def test_every_types_state_goes_into_checkpoints_and_back(tiny_sd1_dir, kind: str) -> None:
    from trainer.lora.inject import load_lora_state, lora_state

    network = NetworkConfig(rank=4, alpha=2.0, targets="full", network=kind, train_text_encoder=False)
    trained, _, _ = _trained(tiny_sd1_dir, network, seed=1)
    fresh, _, _ = _trained(tiny_sd1_dir, network, seed=2)
    state = {k: v.detach().clone() for k, v in lora_state(trained.unet).items()}
    assert len(state) == len(lora_parameters(trained.unet))
    load_lora_state(fresh.unet, state)
    assert all(torch.equal(v, state[k]) for k, v in lora_state(fresh.unet).items())


def test_locon_resizes_and_merges_like_lora(exported, tmp_path) -> None:
    from trainer.tools.resize import merge_loras, resize_lora

    path = exported["locon"][0]
    resize_lora(path, tmp_path / "small.safetensors", rank=2)
    small = read_lora_file(tmp_path / "small.safetensors")
    assert small.network_type == "locon" and {m.rank for m in small.modules.values()} == {2}
    merge_loras([(path, 0.5), (path, 0.5)], tmp_path / "merged.safetensors")
    merged, original = read_lora_file(tmp_path / "merged.safetensors"), read_lora_file(path)
    for name, module in original.modules.items():
        torch.testing.assert_close(merged.modules[name].delta_weight(), module.delta_weight(), atol=1e-5, rtol=1e-4)
