"""Base-model loading: every source, family detection, freezing, and the messages users see."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch

from trainer.config.schema import ModelConfig
from trainer.core.errors import ConfigError, ModelLoadError
from trainer.generate.pipeline import inference_pipeline
from trainer.models.family import (
    BUNDLED_CONFIGS,
    detect_family_from_checkpoint_keys,
    detect_family_from_configs,
)
from trainer.models.loading import load_base_model


@pytest.fixture
def network_attempts(monkeypatch: pytest.MonkeyPatch) -> list:
    """Connections fail like an unplugged cable; every attempt is recorded."""
    attempts: list = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    return attempts


@pytest.fixture(scope="module")
def tiny_model(tiny_sd1_dir: Path):
    return load_base_model(ModelConfig(base=str(tiny_sd1_dir)))


@pytest.fixture(scope="module")
def tiny_single_file(tiny_model, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from trainer.models.single_file import save_single_file

    return save_single_file(tiny_model, tmp_path_factory.mktemp("single") / "tiny-sd1.safetensors", dtype=torch.float32)


def _parameters(model):
    return {part: getattr(model, part).state_dict() for part in ("unet", "vae", "text_encoder")}


# --- loading ---------------------------------------------------------------------------------

def test_diffusers_folder_loads_frozen_sd1(tiny_model, tiny_sd1_dir: Path) -> None:
    m = tiny_model
    assert (m.family, m.prediction_type, m.name, m.source) == ("sd1", "epsilon", "tiny-sd1", str(tiny_sd1_dir))
    assert (m.vae_scale_factor, m.latent_channels, m.native_resolution, m.resolution_multiple) == (8, 4, 64, 64)
    assert m.text_encoders() == [m.text_encoder] and m.text_encoder_2 is None
    for module in (m.unet, m.vae, m.text_encoder):
        assert not module.training
        assert not any(p.requires_grad for p in module.parameters())
    assert type(m.noise_scheduler).__name__ == "DDPMScheduler"
    assert m.noise_scheduler.config.prediction_type == "epsilon"
    assert m.noise_scheduler.config.beta_schedule == m.scheduler_config["beta_schedule"] == "scaled_linear"
    assert m.tokenizer("a cat").input_ids[0] == 49406


def test_prediction_type_override(tiny_sd1_dir: Path) -> None:
    m = load_base_model(ModelConfig(base=str(tiny_sd1_dir), prediction_type="v_prediction"))
    assert m.prediction_type == m.noise_scheduler.config.prediction_type == "v_prediction"


def test_single_file_round_trip_is_exact_and_offline(tiny_model, tiny_single_file: Path, tiny_sd1_dir: Path,
                                                     network_attempts: list, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load (unpickling) was called"))
    m = load_base_model(ModelConfig(base=str(tiny_single_file), base_config=str(tiny_sd1_dir)))
    assert (m.family, m.prediction_type, m.name) == ("sd1", "epsilon", "tiny-sd1")
    assert not any(p.requires_grad for module in (m.unet, m.vae, m.text_encoder) for p in module.parameters())
    original, loaded = _parameters(tiny_model), _parameters(m)
    for part in original:
        assert original[part].keys() == loaded[part].keys(), part
        for key, value in original[part].items():
            assert torch.equal(value, loaded[part][key]), f"{part}.{key} changed in the round trip"
    assert network_attempts == []


def test_single_file_dtype(tiny_single_file: Path, tiny_sd1_dir: Path) -> None:
    m = load_base_model(ModelConfig(base=str(tiny_single_file), base_config=str(tiny_sd1_dir)), dtype=torch.bfloat16)
    assert {p.dtype for p in m.unet.parameters()} == {torch.bfloat16}


# --- messages a user sees --------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin", ".pth"])
def test_pickle_checkpoint_is_refused_unopened(tmp_path: Path, suffix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load (unpickling) was called"))
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(ModelLoadError, match=r"pickle.*\.safetensors"):
        load_base_model(ModelConfig(base=str(path)))


@pytest.mark.parametrize("base", ["{tmp}/missing.safetensors", "{tmp}/no/such/folder", "./no-such-model-dir/x.safetensors"])
def test_missing_path(tmp_path: Path, base: str) -> None:
    with pytest.raises(ModelLoadError, match="Base model not found"):
        load_base_model(ModelConfig(base=base.format(tmp=tmp_path)))


def test_empty_base() -> None:
    with pytest.raises(ModelLoadError, match="No base model given"):
        load_base_model(ModelConfig(base=""))


@pytest.mark.parametrize("offline, reason", [("1", "offline mode is on"), ("", "could not be reached")])
def test_hub_id_not_available_says_how_to_use_a_local_file(network_attempts: list, monkeypatch: pytest.MonkeyPatch,
                                                          tmp_path: Path, offline: str, reason: str) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", bool(offline))
    monkeypatch.chdir(tmp_path)  # so "owner/name" is not a relative path by accident
    with pytest.raises(ModelLoadError) as err:
        load_base_model(ModelConfig(base="lora-studio-tests/no-such-model"))
    text = str(err.value)
    assert "'lora-studio-tests/no-such-model' is not a local path" in text and reason in text
    assert "local diffusers folder or a .safetensors file" in text
    if offline:
        assert network_attempts == []


def test_truncated_safetensors(tiny_single_file: Path, tmp_path: Path) -> None:
    data = tiny_single_file.read_bytes()
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="looks truncated"):
        load_base_model(ModelConfig(base=str(broken)))


def _write_tensors(path: Path, keys: list[str]) -> Path:
    from safetensors.torch import save_file

    save_file({k: torch.zeros(2) for k in keys}, str(path))
    return path


@pytest.mark.parametrize("keys, message", [
    (["conditioner.embedders.1.model.positional_embedding", "model.diffusion_model.out.0.weight"],
     "SDXL models are not supported for training yet"),
    (["cond_stage_model.model.token_embedding.weight"], "SD 2.x models are not supported for training yet"),
    (["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"], "is a LoRA, not a base model"),
    (["model.diffusion_model.out.0.weight"], "no text encoder"),
    (["down_blocks.0.resnets.0.conv1.weight"], "one component of a diffusers model folder"),
    (["something.else"], "does not look like a Stable Diffusion checkpoint"),
])
def test_single_file_refused_before_loading(tmp_path: Path, keys: list[str], message: str) -> None:
    path = _write_tensors(tmp_path / "model.safetensors", keys)
    with pytest.raises(ModelLoadError, match=message):
        load_base_model(ModelConfig(base=str(path)))


def test_folder_without_model_index(tmp_path: Path, tiny_single_file: Path) -> None:
    (tmp_path / "tiny.safetensors").write_bytes(tiny_single_file.read_bytes())
    with pytest.raises(ModelLoadError, match=r"no model_index\.json.*set base to the file itself"):
        load_base_model(ModelConfig(base=str(tmp_path)))


def test_folder_with_pickled_weights_is_refused(tiny_sd1_dir: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load (unpickling) was called"))
    folder = shutil.copytree(tiny_sd1_dir, tmp_path / "old-style")
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_name("diffusion_pytorch_model.bin"))
    with pytest.raises(ModelLoadError, match=r"only pickled \.bin weights"):
        load_base_model(ModelConfig(base=str(folder)))


def test_bad_base_config(tiny_single_file: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="base_config .* is not a diffusers config folder"):
        load_base_model(ModelConfig(base=str(tiny_single_file), base_config=str(tmp_path)))


def test_single_file_with_wrong_config_names_the_fix(tiny_single_file: Path) -> None:
    # The tiny file read with the full-size SD1.5 config: shapes cannot match.
    with pytest.raises(ModelLoadError, match="base_config"):
        load_base_model(ModelConfig(base=str(tiny_single_file)))


# --- family detection ------------------------------------------------------------------------

def _bundled(family: str, part: str, name: str = "config.json") -> dict:
    import json

    return json.loads((BUNDLED_CONFIGS[family] / part / name).read_text())


@pytest.mark.parametrize("unet, te, te2, family", [
    ({"cross_attention_dim": 32}, {"hidden_act": "quick_gelu"}, False, "sd1"),  # tiny SD1
    ({"cross_attention_dim": 32, "use_linear_projection": True}, {"hidden_act": "gelu"}, False, "sd2"),  # tiny SD2
    ({"cross_attention_dim": 1024}, None, False, "sd2"),
    ({"cross_attention_dim": 80, "addition_embed_type": "text_time"}, {"hidden_act": "quick_gelu"}, True, "sdxl"),
    ({"cross_attention_dim": 32}, {"hidden_act": "quick_gelu"}, True, "sdxl"),
    (_bundled("sd1", "unet"), _bundled("sd1", "text_encoder"), False, "sd1"),
    (_bundled("sd2", "unet"), _bundled("sd2", "text_encoder"), False, "sd2"),
    (_bundled("sdxl", "unet"), _bundled("sdxl", "text_encoder"), True, "sdxl"),
])
def test_family_from_configs(unet: dict, te: dict | None, te2: bool, family: str) -> None:
    assert detect_family_from_configs(unet, te, te2) == family


@pytest.mark.parametrize("key, family", [
    ("cond_stage_model.transformer.text_model.embeddings.token_embedding.weight", "sd1"),
    ("cond_stage_model.model.token_embedding.weight", "sd2"),
    ("conditioner.embedders.1.model.positional_embedding", "sdxl"),
])
def test_family_from_checkpoint_keys(key: str, family: str) -> None:
    assert detect_family_from_checkpoint_keys(["model.diffusion_model.out.0.weight", key]) == family


# --- bundled configs -------------------------------------------------------------------------

def _lora_targets(unet, text_encoders) -> tuple[int, int, int, int]:
    """(UNet modules, UNet sum of in+out, TE modules, TE sum) over kohya's default LoRA targets."""

    def width(module) -> int:
        if isinstance(module, torch.nn.Linear):
            return module.in_features + module.out_features
        return module.in_channels + module.out_channels

    unet_mods = [m for name, m in unet.named_modules()
                 if ".attentions." in name and (".transformer_blocks." in name or name.endswith(("proj_in", "proj_out")))
                 and (isinstance(m, torch.nn.Linear)
                      or (isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1)))]
    te_mods = [m for te in text_encoders for name, m in te.named_modules()
               if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}]
    return len(unet_mods), sum(map(width, unet_mods)), len(te_mods), sum(map(width, te_mods))


@pytest.mark.parametrize("family, expected, unet_params", [
    ("sd1", (192, 423_936, 72, 165_888), 859_520_964),  # DESIGN §4
    ("sd2", (192, 432_128, 138, 423_936), 865_910_724),
    ("sdxl", (722, 2_659_840, 264, 903_168), 2_567_463_684),  # 3,563,008 per rank in all (DESIGN §4)
])
def test_bundled_configs_build_the_published_architectures(family: str, expected: tuple, unet_params: int) -> None:
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder = BUNDLED_CONFIGS[family]
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
        tes = [CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))]
        if family == "sdxl":
            tes.append(CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder / "text_encoder_2")))
    assert _lora_targets(unet, tes) == expected
    assert sum(p.numel() for p in unet.parameters()) == unet_params
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863
    assert vae.config.scaling_factor == (0.13025 if family == "sdxl" else 0.18215)
    expected_prediction = "v_prediction" if family == "sd2" else "epsilon"
    assert _bundled(family, "scheduler", "scheduler_config.json")["prediction_type"] == expected_prediction
    assert not list(folder.rglob("*.safetensors")) and not list(folder.rglob("vocab.json"))


def test_bundled_configs_are_package_data() -> None:
    """pyproject ships ``trainer/models/configs/**/*``; every bundled file must sit under that pattern."""
    import tomllib

    root = Path(__file__).parents[1]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["trainer.models"]
    assert "configs/**/*" in patterns
    files = [p for folder in BUNDLED_CONFIGS.values() for p in folder.rglob("*") if p.is_file()]
    assert len(files) == 16


# --- inference pipeline ----------------------------------------------------------------------

def test_inference_pipeline_reuses_components(tiny_model) -> None:
    pipe = inference_pipeline(tiny_model)
    assert pipe.unet is tiny_model.unet and pipe.vae is tiny_model.vae and pipe.text_encoder is tiny_model.text_encoder
    assert pipe.safety_checker is None
    assert type(pipe.scheduler).__name__ == tiny_model.scheduler_config["_class_name"]
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a cat", num_inference_steps=2, height=64, width=64, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 64, 64, 3)


@pytest.mark.parametrize("name, cls, karras", [("euler_a", "EulerAncestralDiscreteScheduler", None),
                                                ("dpmpp_2m_karras", "DPMSolverMultistepScheduler", True)])
def test_inference_pipeline_scheduler_choice(tiny_model, name: str, cls: str, karras: bool | None) -> None:
    scheduler = inference_pipeline(tiny_model, name).scheduler
    assert type(scheduler).__name__ == cls
    assert scheduler.config.prediction_type == tiny_model.prediction_type
    assert scheduler.config.beta_end == tiny_model.scheduler_config["beta_end"]
    if karras is not None:
        assert scheduler.config.use_karras_sigmas is karras


def test_unknown_scheduler(tiny_model) -> None:
    with pytest.raises(ConfigError, match="Unknown sampler 'fast'.*Euler a"):
        inference_pipeline(tiny_model, "fast")
