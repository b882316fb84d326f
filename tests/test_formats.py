"""LoRA files: kohya names, exported keys/metadata/hash/size, interop with diffusers, safe reading."""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from pathlib import Path

import pytest
import safetensors.torch
import torch
from library_logs import library_warnings
from tiny_runs import load_pipeline, merge_by_hand, sd_outputs

from trainer.config.schema import NetworkConfig
from trainer.core.errors import LoraFileError
from trainer.lora.inject import (
    inject_lora,
    plan_lora,
    text_encoder_target_modules,
    unet_target_modules,
)
from trainer.lora.metadata import ExportInfo, build_metadata
from trainer.lora.names import (
    kohya_module_name,
    model_module_path,
    parse_kohya_module_name,
)
from trainer.lora.reading import (
    LoraModule,
    check_lora_fits,
    detect_lora_family,
    read_lora_file,
)
from trainer.lora.writing import (
    METADATA_ESTIMATE_BYTES,
    collect_lora_modules,
    lora_file_size,
    lora_shapes,
    module_shape,
    save_kohya_lora,
    save_peft_lora,
)
from trainer.models.demo import build_tiny_sd1

# --- helpers -------------------------------------------------------------------------------------

UNET_SUFFIXES = {
    "cross-attn": {f"attn2.{p}" for p in ("to_q", "to_k", "to_v", "to_out.0")},
    "attn": {f"attn{i}.{p}" for i in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out.0")},
    "full": {f"attn{i}.{p}" for i in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out.0")}
    | {"ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"},
}
TE_ATTN = {f"self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "out_proj")}
TE_MLP = {"mlp.fc1", "mlp.fc2"}


def _trained_tiny(network: NetworkConfig, seed: int = 0):
    """The tiny SD1 model (base seed 0) with LoRA injected and set to random fp16-exact values."""
    parts = build_tiny_sd1(seed=0)
    plan = plan_lora(network, parts.unet, {"text_encoder": parts.text_encoder})
    inject_lora(parts.unet, plan.modules["unet"], network)
    if network.train_text_encoder:
        inject_lora(parts.text_encoder, plan.modules["text_encoder"], network)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for model in (parts.unet, parts.text_encoder):
            for name, p in model.named_parameters():
                if ".lora_A." in name or ".lora_B." in name:
                    p.copy_((torch.randn(p.shape, generator=g) * 0.3).half().float())
    return parts, plan


def _export_modules(parts, network: NetworkConfig) -> list[LoraModule]:
    modules = collect_lora_modules("unet", parts.unet, "sd1")
    if network.train_text_encoder:
        modules += collect_lora_modules("text_encoder", parts.text_encoder, "sd1")
    return modules


def _info(**overrides) -> ExportInfo:
    values = {"family": "sd1", "output_name": "zxq-style", "rank": 4, "alpha": 2.0, "resolution": (512, 512),
              "num_train_images": 8, "tag_frequency": {"data": {"zxq": 8, "red": 8, "picture 1": 1}},
              "dataset_dirs": {"data": {"n_repeats": 10, "img_count": 8}}, "steps": 800, "epoch": 10, "seed": 42,
              "started_at": 1_700_000_000.0, "finished_at": 1_700_000_600.5, "base_model_name": "tiny-sd1",
              "trigger_phrase": "zxq"}
    return ExportInfo(**{**values, **overrides})


def _independent_names(model: torch.nn.Module, prefix: str, suffixes: set[str]) -> dict[str, str]:
    """kohya name -> module path, built here from the naming rule, not from trainer code."""
    names = {}
    for path, _ in model.named_modules():
        if any(path.endswith("." + s) for s in suffixes):
            stem = path.removeprefix("text_model.")
            names[prefix + stem.replace(".", "_")] = path
    return names


def _hand_merged(file: Path, unet_names: dict[str, str], te_names: dict[str, str]):
    """A fresh base model with W0 + (alpha/r)·up@down added by hand from the file's tensors."""
    parts = build_tiny_sd1(seed=0)
    layers = {stem: parts.unet.get_submodule(path) for stem, path in unet_names.items()}
    layers |= {stem: parts.text_encoder.get_submodule(path) for stem, path in te_names.items()}
    assert merge_by_hand(file, layers) == set(layers)
    return parts


def _outputs(unet, text_encoder):
    return sd_outputs(unet, text_encoder, pad_id=49407)


# --- names ---------------------------------------------------------------------------------------

NAME_CASES = [
    ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k", "sd1",
     "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"),
    ("unet", "up_blocks.1.attentions.2.transformer_blocks.0.attn1.to_out.0", "sd2",
     "lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_attn1_to_out_0"),
    ("unet", "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj", "sd1",
     "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj"),
    ("text_encoder", "encoder.layers.0.self_attn.q_proj", "sd1", "lora_te_text_model_encoder_layers_0_self_attn_q_proj"),
    ("text_encoder", "text_model.encoder.layers.11.mlp.fc2", "sd2", "lora_te_text_model_encoder_layers_11_mlp_fc2"),
    ("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k", "sdxl",
     "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"),
    ("unet", "down_blocks.2.attentions.1.proj_in", "sdxl", "lora_unet_input_blocks_8_1_proj_in"),
    ("unet", "mid_block.attentions.0.transformer_blocks.9.attn1.to_v", "sdxl",
     "lora_unet_middle_block_1_transformer_blocks_9_attn1_to_v"),
    ("unet", "up_blocks.0.attentions.2.proj_out", "sdxl", "lora_unet_output_blocks_2_1_proj_out"),
    ("unet", "up_blocks.1.attentions.0.transformer_blocks.1.ff.net.2", "sdxl",
     "lora_unet_output_blocks_3_1_transformer_blocks_1_ff_net_2"),
    ("text_encoder", "encoder.layers.3.self_attn.out_proj", "sdxl", "lora_te1_text_model_encoder_layers_3_self_attn_out_proj"),
    ("text_encoder_2", "text_model.encoder.layers.31.mlp.fc1", "sdxl", "lora_te2_text_model_encoder_layers_31_mlp_fc1"),
]


@pytest.mark.parametrize(("component", "path", "family", "expected"), NAME_CASES)
def test_kohya_names_and_their_inverse(component, path, family, expected):
    assert kohya_module_name(component, path, family) == expected
    assert parse_kohya_module_name(expected) == (component, path.removeprefix("text_model."))


def test_names_that_cannot_be_mapped_are_refused():
    with pytest.raises(ValueError, match="second text encoder"):
        kohya_module_name("text_encoder_2", "encoder.layers.0.self_attn.q_proj", "sd1")
    with pytest.raises(ValueError, match="attention, resnet and sampler blocks"):
        kohya_module_name("unet", "time_embedding.linear_1", "sdxl")
    with pytest.raises(ValueError):
        parse_kohya_module_name("lora_foo_down_blocks_0")
    with pytest.raises(ValueError, match="not supported"):
        parse_kohya_module_name("lora_unet_out_2")
    # SDXL resnet layers (LoCon) map both ways, in sd-scripts' SGM naming
    assert kohya_module_name("unet", "down_blocks.0.resnets.0.conv1", "sdxl") == "lora_unet_input_blocks_1_0_in_layers_2"
    assert parse_kohya_module_name("lora_unet_input_blocks_1_0_in_layers_2") == ("unet", "down_blocks.0.resnets.0.conv1")
    # SD1 non-attention layers (LoCon) still parse: the path is diffusers' own
    assert parse_kohya_module_name("lora_unet_down_blocks_0_resnets_1_time_emb_proj") == (
        "unet", "down_blocks.0.resnets.1.time_emb_proj")


def test_model_module_path_finds_the_text_model_level_either_way():
    from transformers import CLIPTextConfig, CLIPTextModel

    from trainer.models.demo import TINY_SD1_TEXT

    te = CLIPTextModel(CLIPTextConfig(**TINY_SD1_TEXT))
    real = model_module_path(te, "text_encoder", "text_model.encoder.layers.1.mlp.fc1")
    assert real in dict(te.named_modules())


# --- export: keys, shapes, metadata, hash --------------------------------------------------------


@pytest.mark.parametrize(("targets", "train_te", "te_mlp"), [
    ("cross-attn", False, False), ("attn", True, False), ("full", True, True), ("full", False, False),
])
def test_export_writes_exactly_the_kohya_keys(tmp_path, targets, train_te, te_mlp):
    network = NetworkConfig(rank=4, alpha=2, targets=targets, train_text_encoder=train_te, te_mlp=te_mlp)
    parts, _ = _trained_tiny(network)
    out = tmp_path / "lora.safetensors"
    size = save_kohya_lora(_export_modules(parts, network), build_metadata(_info(targets=targets)), out)
    assert size == out.stat().st_size

    base = build_tiny_sd1()
    expected = {name: base.unet.get_submodule(path)
                for name, path in _independent_names(base.unet, "lora_unet_", UNET_SUFFIXES[targets]).items()}
    if train_te:
        te_names = _independent_names(base.text_encoder, "lora_te_text_model_", TE_ATTN | (TE_MLP if te_mlp else set()))
        expected |= {name: base.text_encoder.get_submodule(path) for name, path in te_names.items()}
    state = safetensors.torch.load_file(str(out))
    assert set(state) == {f"{n}.{part}" for n in expected for part in ("lora_down.weight", "lora_up.weight", "alpha")}
    for name, layer in expected.items():
        down, up, alpha = state[f"{name}.lora_down.weight"], state[f"{name}.lora_up.weight"], state[f"{name}.alpha"]
        assert alpha.dim() == 0 and alpha.item() == 2.0
        assert down.dtype == up.dtype == torch.float16
        if isinstance(layer, torch.nn.Conv2d):  # SD1's proj_in/proj_out are 1x1 convs: 4-D
            assert name.endswith(("proj_in", "proj_out"))
            assert down.shape == (4, layer.in_channels, 1, 1) and up.shape == (layer.out_channels, 4, 1, 1)
        else:
            assert down.shape == (4, layer.in_features) and up.shape == (layer.out_features, 4)


def test_metadata_is_complete_and_hash_covers_the_tensor_bytes(tmp_path):
    network = NetworkConfig(rank=4, alpha=2, targets="full")
    parts, _ = _trained_tiny(network)
    out = tmp_path / "lora.safetensors"
    save_kohya_lora(_export_modules(parts, network), build_metadata(_info()), out)
    with safetensors.safe_open(str(out), "pt") as fh:
        meta = fh.metadata()
    required = {"ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_base_model_version", "ss_v2",
                "ss_output_name", "ss_resolution", "ss_num_train_images", "ss_tag_frequency", "ss_dataset_dirs",
                "ss_bucket_info", "ss_learning_rate", "ss_steps", "ss_epoch", "ss_seed", "ss_training_started_at",
                "ss_training_finished_at", "ss_sd_model_name", "ss_clip_skip", "modelspec.sai_model_spec",
                "modelspec.architecture", "modelspec.title", "modelspec.resolution", "modelspec.trigger_phrase",
                "sshs_model_hash"}
    assert required <= set(meta) and all(isinstance(v, str) for v in meta.values())
    assert "lora_adapter_metadata" not in meta
    assert (meta["ss_network_module"], meta["ss_network_dim"], meta["ss_network_alpha"]) == ("networks.lora", "4", "2.0")
    assert meta["ss_base_model_version"] == "sd_v1" and meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert json.loads(meta["ss_tag_frequency"]) == {"data": {"zxq": 8, "red": 8, "picture 1": 1}}
    assert json.loads(meta["ss_dataset_dirs"])["data"]["n_repeats"] == 10
    assert meta["modelspec.sai_model_spec"] == "1.0.1" and meta["modelspec.resolution"] == "512x512"

    raw = out.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    assert meta["sshs_model_hash"] == hashlib.sha256(raw[8 + header_len:]).hexdigest()
    # a different header (other metadata) leaves the hash valid: it only covers the tensor bytes
    other = tmp_path / "other.safetensors"
    save_kohya_lora(_export_modules(parts, network), build_metadata(_info(output_name="renamed")), other)
    with safetensors.safe_open(str(other), "pt") as fh:
        assert fh.metadata()["sshs_model_hash"] == meta["sshs_model_hash"]


@pytest.mark.parametrize(("family", "v_pred", "version", "arch"), [
    ("sd1", False, "sd_v1", "stable-diffusion-v1/lora"),
    ("sd2", True, "sd_v2_v", "stable-diffusion-v2-768-v/lora"),  # kohya marks v-prediction "_v"
    ("sd2", False, "sd_v2", "stable-diffusion-v2-512/lora"),
    ("sdxl", False, "sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora"),
])
def test_metadata_names_the_base_model_family(family, v_pred, version, arch):
    meta = build_metadata(_info(family=family, v_parameterization=v_pred))
    assert meta["ss_base_model_version"] == version and meta["modelspec.architecture"] == arch
    assert meta["ss_v2"] == str(family == "sd2")


def test_export_refuses_nan_and_fp16_overflow_and_writes_nothing(tmp_path):
    out = tmp_path / "bad.safetensors"
    nan = LoraModule("lora_unet_a_to_q", torch.full((2, 4), float("nan")), torch.zeros(4, 2), 2.0)
    with pytest.raises(LoraFileError, match="NaN"):
        save_kohya_lora([nan], {}, out)
    huge = LoraModule("lora_unet_a_to_q", torch.full((2, 4), 1e6), torch.zeros(4, 2), 2.0)
    with pytest.raises(LoraFileError, match="bf16/fp32"):
        save_kohya_lora([huge], {}, out, dtype="fp16")
    assert list(tmp_path.iterdir()) == []
    save_kohya_lora([huge], {}, out, dtype="fp32")
    with pytest.raises(ValueError, match="lora_adapter_metadata"):
        save_kohya_lora([huge], {"lora_adapter_metadata": "{}"}, tmp_path / "x.safetensors", dtype="fp32")


# --- exact file size -----------------------------------------------------------------------------


@pytest.mark.parametrize(("rank", "dtype", "rslora"), [(8, "fp16", False), (32, "fp16", False),
                                                       (8, "bf16", True), (32, "fp32", True)])
def test_file_size_is_exact_for_the_tiny_model(tmp_path, rank, dtype, rslora):
    network = NetworkConfig(rank=rank, alpha=rank / 2, targets="full", te_mlp=True, rslora=rslora)
    parts, plan = _trained_tiny(network)
    modules = _export_modules(parts, network)
    meta = build_metadata(_info(rank=rank, alpha=rank / 2, rslora=rslora))
    written = save_kohya_lora(modules, meta, tmp_path / "l.safetensors", dtype=dtype)
    fresh = build_tiny_sd1()  # sizes come from the plan and a model without LoRA
    shapes = lora_shapes("unet", fresh.unet, plan.modules["unet"], "sd1") + lora_shapes(
        "text_encoder", fresh.text_encoder, plan.modules["text_encoder"], "sd1")
    assert sorted(shapes) == sorted(module_shape(m) for m in modules)
    alpha = modules[0].alpha
    assert lora_file_size(shapes, rank, dtype, alpha=alpha, metadata=meta) == written
    assert abs(lora_file_size(shapes, rank, dtype, alpha=alpha) - written) < 500


def test_file_size_of_a_real_sd15_shaped_lora(tmp_path):
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with init_empty_weights():  # the SD1.5 architecture with no memory behind it
        unet = UNet2DConditionModel(cross_attention_dim=768)
        te = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                          num_hidden_layers=12, max_position_embeddings=77))
    unet_shapes = lora_shapes("unet", unet, unet_target_modules(unet, "full"), "sd1")
    te_shapes = lora_shapes("text_encoder", te, text_encoder_target_modules(te, include_mlp=True), "sd1")
    assert (len(unet_shapes), len(te_shapes)) == (192, 72)
    assert sum(s.in_features + s.out_features for s in unet_shapes) == 423_936
    assert sum(s.in_features + s.out_features for s in te_shapes) == 165_888
    shapes = unet_shapes + te_shapes
    meta = build_metadata(_info(rank=32, alpha=16))
    predicted = lora_file_size(shapes, 32, "fp16", alpha=16.0, metadata=meta)
    assert predicted == pytest.approx(37.9e6, rel=0.003)
    modules = [LoraModule(s.name, torch.zeros(32, s.in_features, *([1, 1] if s.conv else [])),
                          torch.zeros(s.out_features, 32, *([1, 1] if s.conv else [])), 16.0) for s in shapes]
    assert save_kohya_lora(modules, meta, tmp_path / "sd15.safetensors") == predicted


def test_metadata_estimate_is_close_to_typical_metadata():
    typical = len(json.dumps(build_metadata(_info()), separators=(",", ":")))
    assert abs(typical - METADATA_ESTIMATE_BYTES) < 400


# --- interop with diffusers ----------------------------------------------------------------------


def _assert_loads_like_hand_merge(tiny_sd1_dir, file: Path, reference: Path, parts, network: NetworkConfig):
    """diffusers loads ``file`` with no warning, and its outputs equal a hand merge of ``reference``."""
    pipe = load_pipeline(tiny_sd1_dir)
    with library_warnings() as messages:
        pipe.load_lora_weights(str(file), adapter_name="exported")
    assert messages == []
    base = build_tiny_sd1()
    te_suffixes = TE_ATTN | (TE_MLP if network.te_mlp else set())
    merged = _hand_merged(
        reference,
        _independent_names(base.unet, "lora_unet_", UNET_SUFFIXES[network.targets]),
        _independent_names(base.text_encoder, "lora_te_text_model_", te_suffixes) if network.train_text_encoder else {})
    base_unet, base_te = _outputs(base.unet, base.text_encoder)
    loaded_unet, loaded_te = _outputs(pipe.unet, pipe.text_encoder)
    want_unet, want_te = _outputs(merged.unet, merged.text_encoder)
    trained_unet, trained_te = _outputs(parts.unet, parts.text_encoder)
    for got, trained, want, base_out in ((loaded_unet, trained_unet, want_unet, base_unet),
                                         (loaded_te, trained_te, want_te, base_te)):
        effect = (want - base_out).abs().max().item()
        assert effect > 0.1  # the LoRA changes the output a lot, so a wrong scale could not pass
        # merged (hand) vs unmerged (peft) differ only by fp32 rounding, far below the effect
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4 * effect)
        torch.testing.assert_close(trained, want, rtol=0, atol=1e-4 * effect)


@pytest.mark.parametrize("rslora", [False, True])
def test_kohya_export_loads_in_diffusers_with_the_right_scale(tmp_path, tiny_sd1_dir, rslora):
    # alpha != rank on purpose: a loader that ignored alpha would be off by a factor
    network = NetworkConfig(rank=4, alpha=3 if rslora else 2, targets="full", te_mlp=True, rslora=rslora)
    parts, _ = _trained_tiny(network)
    modules = _export_modules(parts, network)
    assert {m.alpha for m in modules} == {6.0 if rslora else 2.0}  # rsLoRA: alpha·sqrt(r), so alpha/r = 3/2
    out = tmp_path / "lora.safetensors"
    save_kohya_lora(modules, build_metadata(_info(alpha=network.alpha, rslora=rslora)), out)
    _assert_loads_like_hand_merge(tiny_sd1_dir, out, out, parts, network)


def test_peft_export_loads_in_diffusers_with_the_same_outputs(tmp_path, tiny_sd1_dir):
    network = NetworkConfig(rank=4, alpha=2, targets="full", te_mlp=True)
    parts, _ = _trained_tiny(network)
    modules = _export_modules(parts, network)
    save_kohya_lora(modules, build_metadata(_info()), tmp_path / "lora.safetensors")  # the hand-merge reference
    peft_file = tmp_path / "lora_peft.safetensors"
    save_peft_lora(modules, peft_file)
    assert all(k.startswith(("unet.", "text_encoder.")) for k in safetensors.torch.load_file(str(peft_file)))
    _assert_loads_like_hand_merge(tiny_sd1_dir, peft_file, tmp_path / "lora.safetensors", parts, network)


def test_warning_capture_sees_diffusers_warnings(tmp_path, tiny_sd1_dir):
    # The no-warning assertions above mean something only if this harness sees diffusers' warnings.
    network = NetworkConfig(rank=4, alpha=2, targets="cross-attn", train_text_encoder=False)
    parts, _ = _trained_tiny(network)
    out = tmp_path / "unet_only.safetensors"
    save_kohya_lora(_export_modules(parts, network), {}, out)
    pipe = load_pipeline(tiny_sd1_dir)
    with library_warnings() as messages:
        pipe.load_lora_weights(str(out))
    assert any("No LoRA keys associated to CLIPTextModel" in m for m in messages)


# --- reading any LoRA file -----------------------------------------------------------------------


def _old_diffusers_state(modules: list[LoraModule]) -> dict[str, torch.Tensor]:
    """The pre-PEFT diffusers layout (attention processors, lora_linear_layer), no alpha: scale folded in."""
    state = {}
    for m in modules:
        component, path = parse_kohya_module_name(m.name)
        up = (m.up.float() * m.scale).half()
        if component == "unet":
            match = re.match(r"(.+)\.(to_q|to_k|to_v|to_out)(\.0)?$", path)
            stem = f"unet.{match[1]}.processor.{match[2]}_lora" if match else f"unet.{path}.lora"
        else:
            stem = f"text_encoder.text_model.{path}.lora_linear_layer"
        state[f"{stem}.down.weight"], state[f"{stem}.up.weight"] = m.down.half(), up
    return state


def test_kohya_peft_and_old_diffusers_files_normalise_to_the_same_modules(tmp_path):
    network = NetworkConfig(rank=4, alpha=2, targets="full", te_mlp=True)
    parts, _ = _trained_tiny(network)
    modules = _export_modules(parts, network)
    meta = build_metadata(_info())
    save_kohya_lora(modules, meta, tmp_path / "k.safetensors")
    save_peft_lora(modules, tmp_path / "p.safetensors", metadata=meta)
    safetensors.torch.save_file(_old_diffusers_state(modules), str(tmp_path / "o.safetensors"))

    kohya, peft, old = (read_lora_file(tmp_path / f"{n}.safetensors") for n in "kpo")
    assert (kohya.style, peft.style, old.style) == ("kohya", "peft", "diffusers-old")
    assert kohya.family == peft.family == "sd1" and old.family is None  # tiny widths: metadata decides
    assert set(kohya.modules) == set(peft.modules) == set(old.modules) == {m.name for m in modules}
    for name, k in kohya.modules.items():
        p, o = peft.modules[name], old.modules[name]
        assert torch.equal(k.down, p.down) and torch.equal(k.up, p.up) and k.alpha == p.alpha == 2.0
        assert o.alpha == o.rank  # old files carry no alpha: scale 1, the scale is inside up
        torch.testing.assert_close(o.delta_weight(), k.delta_weight())


def test_rslora_peft_metadata_is_read_as_kohya_alpha(tmp_path):
    down, up = torch.randn(4, 8).half(), torch.randn(8, 4).half()
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q"
    config = {"unet.r": 4, "unet.lora_alpha": 3, "unet.use_rslora": True}
    safetensors.torch.save_file({f"{key}.lora_A.weight": down, f"{key}.lora_B.weight": up},
                                str(tmp_path / "p.safetensors"), {"lora_adapter_metadata": json.dumps(config)})
    module = next(iter(read_lora_file(tmp_path / "p.safetensors").modules.values()))
    assert module.scale == pytest.approx(3 / math.sqrt(4)) and module.alpha == pytest.approx(6.0)


def test_pickles_are_refused_by_extension_and_by_content(tmp_path):
    torch.save({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, tmp_path / "evil.ckpt")
    with pytest.raises(LoraFileError, match="pickle.*run any code") as err:
        read_lora_file(tmp_path / "evil.ckpt")
    assert "safetensors" in str(err.value) and "weights_only=True" in str(err.value)
    for name, zipped in (("renamed.safetensors", True), ("legacy.safetensors", False)):
        torch.save({"w": torch.zeros(2, 2)}, tmp_path / name, _use_new_zipfile_serialization=zipped)
        with pytest.raises(LoraFileError, match="pickle"):
            read_lora_file(tmp_path / name)


def _kohya_file(tmp_path: Path) -> Path:
    out = tmp_path / "good.safetensors"
    modules = [LoraModule(f"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_{p}",
                          torch.randn(4, 768), torch.randn(320, 4), 4.0) for p in "qkv"]
    save_kohya_lora(modules, {}, out)
    return out


@pytest.mark.parametrize(("damage", "message"), [
    ("truncate", "truncated"),
    ("header_longer_than_file", "truncated"),
    ("header_over_100mb", "100 MB"),
    ("bad_json", "not valid JSON"),
    ("tiny", "truncated"),
    ("trailing_bytes", "unexpected bytes"),
])
def test_damaged_files_are_refused_with_a_clear_message(tmp_path, damage, message):
    good = _kohya_file(tmp_path).read_bytes()
    bad = tmp_path / "bad.safetensors"
    if damage == "truncate":
        bad.write_bytes(good[:-100])
    elif damage == "header_longer_than_file":
        bad.write_bytes(struct.pack("<Q", 5000) + b'{"a":1}')
    elif damage == "header_over_100mb":
        bad.write_bytes(struct.pack("<Q", 200 * 2**20) + b"{" + b" " * 64)
    elif damage == "bad_json":
        bad.write_bytes(struct.pack("<Q", 8) + b"{not js}")
    elif damage == "tiny":
        bad.write_bytes(b"\x05\x00")
    else:
        bad.write_bytes(good + b"extra")
    with pytest.raises(LoraFileError, match=message):
        read_lora_file(bad)


def _write(tmp_path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    out = tmp_path / "x.safetensors"
    safetensors.torch.save_file(tensors, str(out), metadata)
    return out


STEM = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"


@pytest.mark.parametrize(("tensors", "message"), [
    ({f"{STEM}.lora_down.weight": torch.full((4, 8), float("nan")), f"{STEM}.lora_up.weight": torch.zeros(8, 4)},
     "NaN"),
    ({f"{STEM}.lora_down.weight": torch.zeros(4, 8), f"{STEM}.alpha": torch.tensor(4.0)}, f"{STEM} .*no lora_up"),
    ({f"{STEM}.lora_up.weight": torch.zeros(8, 4)}, "no lora_down"),
    ({f"{STEM}.lora_down.weight": torch.zeros(4, 8), f"{STEM}.lora_up.weight": torch.zeros(8, 2)},
     "rank 4 in lora_down but 2 in lora_up"),
    ({f"{STEM}.lora_down.weight": torch.zeros(4, 8, dtype=torch.int32), f"{STEM}.lora_up.weight": torch.zeros(8, 4)},
     "floating point"),
    ({f"{STEM}.hada_w1_a": torch.zeros(4, 8), f"{STEM}.hada_w1_b": torch.zeros(4, 8)}, "LoHa"),
    ({"transformer.single_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 8),
      "transformer.single_blocks.0.attn.to_q.lora_B.weight": torch.zeros(8, 4)}, "not part of a LoRA"),
])
def test_broken_lora_contents_are_refused(tmp_path, tensors, message):
    with pytest.raises(LoraFileError, match=message):
        read_lora_file(_write(tmp_path, tensors))


def _pair(rank: int, in_features: int, out_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(rank, in_features).half(), torch.randn(out_features, rank).half()


def _kohya_pairs(stems_widths: dict[str, tuple[int, int]]) -> dict[str, torch.Tensor]:
    state = {}
    for stem, (in_f, out_f) in stems_widths.items():
        state[f"{stem}.lora_down.weight"], state[f"{stem}.lora_up.weight"] = _pair(4, in_f, out_f)
        state[f"{stem}.alpha"] = torch.tensor(2.0).half()
    return state


@pytest.mark.parametrize(("tensors", "metadata", "family"), [
    (_kohya_pairs({STEM: (768, 320)}), None, "sd1"),
    (_kohya_pairs({STEM: (1024, 320)}), {"ss_base_model_version": "sd_v1"}, "sd2"),  # shapes beat metadata
    (_kohya_pairs({"lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k": (2048, 640)}), None, "sdxl"),
    (_kohya_pairs({"lora_te2_text_model_encoder_layers_0_self_attn_q_proj": (1280, 1280)}), None, "sdxl"),
    (_kohya_pairs({"lora_te_text_model_encoder_layers_0_self_attn_q_proj": (1024, 1024)}), None, "sd2"),
    (_kohya_pairs({STEM: (32, 32)}), {"ss_base_model_version": "sdxl_base_v1-0"}, "sdxl"),
    (_kohya_pairs({STEM: (32, 32)}), {"ss_base_model_version": "sd_v1"}, "sd1"),
    (_kohya_pairs({STEM: (32, 32)}), None, None),
    (dict(zip(("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight",
               "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_B.weight"),
              _pair(4, 2048, 640))), None, "sdxl"),
    (dict(zip(("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight",  # bare PEFT keys
               "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_B.weight"), _pair(4, 768, 320))),
     None, "sd1"),
    (dict(zip(("text_encoder_2.text_model.encoder.layers.0.mlp.fc1.lora_A.weight",
               "text_encoder_2.text_model.encoder.layers.0.mlp.fc1.lora_B.weight"), _pair(4, 1280, 5120))), None, "sdxl"),
])
def test_family_detection(tmp_path, tensors, metadata, family):
    file = read_lora_file(_write(tmp_path, tensors, metadata))
    assert file.family == family
    assert detect_lora_family(file) == family


def test_peft_sdxl_file_gets_kohya_sgm_names(tmp_path):
    key = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    down, up = _pair(4, 2048, 640)
    file = read_lora_file(_write(tmp_path, {f"{key}.lora_A.weight": down, f"{key}.lora_B.weight": up}))
    assert list(file.modules) == ["lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"]
    assert file.modules["lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"].alpha == 4.0  # no metadata


def test_family_mismatch_is_refused_with_a_clear_message(tmp_path):
    file = read_lora_file(_write(tmp_path, _kohya_pairs(
        {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k": (2048, 640)})))
    check_lora_fits(file, "sdxl")
    with pytest.raises(LoraFileError, match=r"made for SDXL but the loaded model is SD 1\.x") as err:
        check_lora_fits(file, "sd1")
    assert "Pick an SDXL base model or another LoRA" in str(err.value)
    unknown = read_lora_file(_write(tmp_path, _kohya_pairs({STEM: (32, 32)})))
    check_lora_fits(unknown, "sdxl")  # undecidable files are not refused here


def test_read_reports_dtype_and_keeps_fp32_alpha_exact(tmp_path):
    module = LoraModule(STEM, torch.randn(8, 768), torch.randn(320, 8), 8 * math.sqrt(8))
    save_kohya_lora([module], {}, tmp_path / "b.safetensors", dtype="bf16")
    state = safetensors.torch.load_file(str(tmp_path / "b.safetensors"))
    assert state[f"{STEM}.alpha"].dtype == torch.float32  # alpha·sqrt(r) would round in bf16
    file = read_lora_file(tmp_path / "b.safetensors")
    assert file.dtype == "bf16" and file.modules[STEM].scale == pytest.approx(math.sqrt(8), rel=1e-6)


# --- SDXL: SGM block names and two text encoders -------------------------------------------------


def _tiny_sdxl_pipeline():
    """A tiny SDXL pipeline in memory (layers_per_block=2 like SDXL, so SGM block numbers line up)."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
    )

    from trainer.models.demo import SD_SCHEDULER, TINY_SD1_TEXT, TINY_SD1_VAE
    from trainer.models.family import TOKENIZER_DIR

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=80,
        norm_num_groups=8)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TINY_SD1_TEXT))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**{**TINY_SD1_TEXT, "hidden_act": "gelu"}))
    tokenizer = CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR))
    scheduler = EulerDiscreteScheduler(**{k: v for k, v in SD_SCHEDULER.items() if k not in ("set_alpha_to_one",
                                                                                              "skip_prk_steps")})
    return StableDiffusionXLPipeline(vae=AutoencoderKL(**TINY_SD1_VAE), text_encoder=text_encoder,
                                     text_encoder_2=text_encoder_2, tokenizer=tokenizer, tokenizer_2=tokenizer,
                                     unet=unet, scheduler=scheduler)


def _sdxl_outputs(pipe):
    g = torch.Generator().manual_seed(3)
    x, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 9, 64, generator=g)
    cond = {"text_embeds": torch.randn(1, 32, generator=g), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    ids = torch.tensor([[49406, 320, 1125, 49407]])
    with torch.no_grad():
        return (pipe.unet(x, torch.tensor([500]), ctx, added_cond_kwargs=cond).sample,
                pipe.text_encoder(ids)[0], pipe.text_encoder_2(ids).text_embeds)


def test_sdxl_export_uses_sgm_names_and_loads_in_diffusers(tmp_path):
    network = NetworkConfig(rank=4, alpha=2, targets="full", te_mlp=True)
    trained = _tiny_sdxl_pipeline()
    base_outputs = _sdxl_outputs(trained)
    encoders = {"text_encoder": trained.text_encoder, "text_encoder_2": trained.text_encoder_2}
    plan = plan_lora(network, trained.unet, encoders)
    g = torch.Generator().manual_seed(1)
    for component, model in (("unet", trained.unet), *encoders.items()):
        inject_lora(model, plan.modules[component], network)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".lora_A." in name or ".lora_B." in name:
                    p.copy_((torch.randn(p.shape, generator=g) * 0.3).half().float())
    modules = [m for c, model in (("unet", trained.unet), *encoders.items())
               for m in collect_lora_modules(c, model, "sdxl")]
    names = {m.name for m in modules}
    assert "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k" in names
    assert "lora_unet_output_blocks_2_1_proj_out" in names and "lora_unet_middle_block_1_proj_in" in names
    assert "lora_te1_text_model_encoder_layers_1_mlp_fc2" in names
    assert "lora_te2_text_model_encoder_layers_0_self_attn_out_proj" in names
    assert not any("down_blocks" in n or "up_blocks" in n or "mid_block" in n for n in names)
    assert all(m.down.dim() == 2 for m in modules)  # SDXL's proj_in/proj_out are Linear
    out = tmp_path / "sdxl.safetensors"
    save_kohya_lora(modules, build_metadata(_info(family="sdxl", resolution=(1024, 1024))), out)

    pipe = _tiny_sdxl_pipeline()
    with library_warnings() as messages:
        pipe.load_lora_weights(str(out), adapter_name="exported")
    assert messages == []
    for got, want, base_out in zip(_sdxl_outputs(pipe), _sdxl_outputs(trained), base_outputs):
        effect = (want - base_out).abs().max().item()
        assert effect > 0.05
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * effect)
    file = read_lora_file(out)
    assert file.family == "sdxl" and set(file.modules) == names
