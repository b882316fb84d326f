"""SD 2.x end to end on a tiny SD2-shaped model: detection, v-prediction training, export, loading.

The tiny model has what sets SD 2.x apart from SD1: an OpenCLIP-style text encoder (gelu, padded
with "!"), Linear proj_in/proj_out (``use_linear_projection``) and a v-prediction schedule like
the 768 px SD 2.1 model.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import safetensors.torch
import torch
from conftest import write_captioned_images
from library_logs import library_warnings
from PIL import Image
from tiny_runs import (
    assert_same_weights,
    capture_training_step,
    image_batch,
    load_pipeline,
    merge_by_hand,
    run_config,
    scaled_linear_alphas_cumprod,
    sd_outputs,
)

from trainer.config.schema import ModelConfig
from trainer.core.errors import LoraFileError
from trainer.lora.reading import check_lora_fits, read_lora_file
from trainer.models.demo import build_tiny_sd2, write_tiny_sd2
from trainer.models.loading import load_base_model
from trainer.train.events import RunFinished, SamplesMade
from trainer.train.loop import train
from trainer.train.session import open_session

pytestmark = pytest.mark.usefixtures("one_torch_thread")
STEPS = 60


@pytest.fixture(scope="module")
def sd2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_sd2(tmp_path_factory.mktemp("models") / "tiny-sd2", seed=0)


@pytest.fixture(scope="module")
def sd2_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_captioned_images(tmp_path_factory.mktemp("sd2") / "data", [(64, 64)] * 4)


def _config(model: Path, data: Path, out: Path, **overrides):
    return run_config(model, data, out, steps=STEPS, seed=5, **overrides)


@pytest.fixture(scope="module")
def trained(sd2_dir: Path, sd2_data: Path, tmp_path_factory: pytest.TempPathFactory) -> RunFinished:
    out = tmp_path_factory.mktemp("sd2-run")
    events = list(train(_config(sd2_dir, sd2_data, out, lr=1e-2, te_lr=1e-2, sample_every=STEPS, sample_steps=2)))
    assert isinstance(events[-1], RunFinished)
    samples = [e for e in events if isinstance(e, SamplesMade)]
    assert len(samples) == 1 and Image.open(samples[0].paths[0]).size == (64, 64)  # v-prediction sampling runs
    return events[-1]


# --- detection and the v-prediction objective ------------------------------------------------------


def test_sd2_is_detected_from_the_model_itself(sd2_dir):
    model = load_base_model(ModelConfig(base=str(sd2_dir)), supported=("sd1", "sd2", "sdxl"))
    assert (model.family, model.prediction_type) == ("sd2", "v_prediction")
    assert model.noise_scheduler.config.prediction_type == "v_prediction"
    assert isinstance(model.unet.down_blocks[0].attentions[0].proj_in, torch.nn.Linear)
    assert model.tokenizer.pad_token == "!" and model.text_encoder_2 is None
    forced = load_base_model(ModelConfig(base=str(sd2_dir), prediction_type="epsilon"), supported=("sd2",))
    assert forced.noise_scheduler.config.prediction_type == "epsilon"


def test_single_file_sd2_checkpoint_loads_as_v_prediction_sd2(sd2_dir, tmp_path):
    from trainer.models.single_file import save_single_file

    folder_model = load_base_model(ModelConfig(base=str(sd2_dir)), supported=("sd2",))
    single = save_single_file(folder_model, tmp_path / "tiny-sd2.safetensors", dtype=torch.float32)
    model = load_base_model(ModelConfig(base=str(single), base_config=str(sd2_dir)), supported=("sd1", "sd2", "sdxl"))
    assert (model.family, model.prediction_type) == ("sd2", "v_prediction")
    assert_same_weights(model, folder_model, ("unet", "text_encoder"))


def test_training_target_is_the_velocity_and_step_zero_is_the_base(sd2_dir, sd2_data, tmp_path, monkeypatch):
    session = open_session(_config(sd2_dir, sd2_data, tmp_path, batch_size=2), lambda level, text: None)
    base = load_pipeline(sd2_dir)
    ids = base.tokenizer(["zxq, portrait"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    g = torch.Generator().manual_seed(0)
    noisy, t, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500]), torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        assert torch.equal(session.text_embeddings_for(["zxq, portrait"])[0], base.text_encoder(ids)[0])
        assert torch.equal(session.model.unet(noisy, t, ctx).sample, base.unet(noisy, t, ctx).sample)

    seen = capture_training_step(monkeypatch, session, [10, 900])
    assert seen["time_ids"] is None  # size conditioning is SDXL's alone
    a = scaled_linear_alphas_cumprod()[[10, 900]].float().view(2, 1, 1, 1)
    velocity = a.sqrt() * seen["noise"] - (1 - a).sqrt() * seen["latents"]
    torch.testing.assert_close(seen["target"], velocity, rtol=1e-5, atol=1e-6)
    from diffusers import DDIMScheduler

    reference = DDIMScheduler.from_pretrained(str(sd2_dir), subfolder="scheduler")
    torch.testing.assert_close(seen["target"], reference.get_velocity(seen["latents"], seen["noise"],
                                                                      torch.tensor([10, 900])))
    assert not torch.allclose(seen["target"], seen["noise"])  # not the epsilon target


# --- training, export, loading ---------------------------------------------------------------------


def _eval_loss(pipe, data: Path) -> float:
    """v-prediction loss of a pipeline on the training images at fixed noise and timesteps."""
    images = sorted(data.glob("*.png"))
    pixels = image_batch(images)
    ids = pipe.tokenizer([p.with_suffix(".txt").read_text(encoding="utf-8") for p in images], padding="max_length",
                         max_length=77, return_tensors="pt").input_ids
    alphas_cumprod = scaled_linear_alphas_cumprod().float()
    g = torch.Generator().manual_seed(0)
    total = 0.0
    with torch.no_grad():
        latents = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
        text = pipe.text_encoder(ids)[0]
        for t in (100, 300, 500, 700, 900):
            noise = torch.randn(latents.shape, generator=g)
            a = alphas_cumprod[t]
            noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
            velocity = a.sqrt() * noise - (1 - a).sqrt() * latents
            prediction = pipe.unet(noisy, torch.full((len(images),), t), text).sample
            total += torch.nn.functional.mse_loss(prediction, velocity).item()
    return total / 5


def _hand_merged(file: Path):
    """A fresh tiny SD2 with W0 + (alpha/r)·up@down added from the file, names built from DESIGN §4."""
    parts = build_tiny_sd2(seed=0)
    names = {"lora_unet_" + path.replace(".", "_"): module for path, module in parts.unet.named_modules()
             if isinstance(module, torch.nn.Linear) and ".attentions." in path}
    names |= {"lora_te_text_model_" + path.removeprefix("text_model.").replace(".", "_"): module
              for path, module in parts.text_encoder.named_modules()
              if isinstance(module, torch.nn.Linear) and ".layers." in path}
    merge_by_hand(file, names)
    return parts


def _outputs(unet, text_encoder):
    return sd_outputs(unet, text_encoder, pad_id=0)  # OpenCLIP pads with "!"


def test_training_learns_and_writes_an_sd2_kohya_file(trained, sd2_dir, sd2_data):
    tensors = safetensors.torch.load_file(str(trained.output))
    stems = {k.rsplit(".", 2)[0] for k in tensors if k.endswith(".lora_down.weight")}
    assert all(s.startswith(("lora_unet_down_blocks_", "lora_unet_mid_block_", "lora_unet_up_blocks_",
                             "lora_te_text_model_encoder_layers_")) for s in stems)  # diffusers names, like SD1
    proj_in = "lora_unet_down_blocks_0_attentions_0_proj_in"
    assert tensors[f"{proj_in}.lora_down.weight"].shape == (4, 32)  # Linear in SD2: 2-D, not [r, C, 1, 1]
    assert tensors["lora_unet_up_blocks_1_attentions_0_proj_out.lora_up.weight"].shape == (32, 4)
    assert "lora_te_text_model_encoder_layers_1_self_attn_out_proj" in stems

    meta = read_lora_file(trained.output).metadata
    assert meta["ss_v2"] == "True" and meta["ss_base_model_version"] == "sd_v2_v"  # kohya marks v-prediction
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
    assert meta["modelspec.prediction_type"] == "v"

    base_loss = _eval_loss(load_pipeline(sd2_dir), sd2_data)
    pipe = load_pipeline(sd2_dir)
    pipe.load_lora_weights(str(trained.output), adapter_name="trained")
    assert _eval_loss(pipe, sd2_data) < 0.9 * base_loss


def test_diffusers_loads_the_export_as_the_independent_merge(trained, sd2_dir):
    pipe = load_pipeline(sd2_dir)
    base = _outputs(pipe.unet, pipe.text_encoder)
    with library_warnings() as messages:
        pipe.load_lora_weights(str(trained.output), adapter_name="exported")
    assert messages == []
    merged = _hand_merged(trained.output)
    for got, want, before in zip(_outputs(pipe.unet, pipe.text_encoder), _outputs(merged.unet, merged.text_encoder),
                                 base):
        effect = (want - before).abs().max().item()
        assert effect > 0.1
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4 * effect)


def test_family_is_detected_and_a_mismatch_is_refused(trained):
    file = read_lora_file(trained.output)
    assert file.family == "sd2"
    check_lora_fits(file, "sd2")
    for other, label in (("sd1", r"SD 1\.x"), ("sdxl", "SDXL")):
        with pytest.raises(LoraFileError, match=rf"made for SD 2\.x but the loaded model is {label}"):
            check_lora_fits(file, other)
