"""SDXL end to end on a tiny SDXL-shaped model: conditioning, training, export, loading, generation.

The tiny model has SDXL's block layout (three levels, two layers per block, transformer depths
1/1/2), two text encoders and size/crop conditioning, so everything that differs from SD1 is
exercised: both encoders' hidden states, the pooled embedding, ``add_time_ids`` from the real
image geometry, LoRA on both encoders, SGM block names and ``lora_te1_``/``lora_te2_`` keys.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
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
)

from trainer.core.errors import ConfigError, LoraFileError
from trainer.data.training_set import SampleRef
from trainer.generate.pipeline import make_inference_scheduler
from trainer.lora.metadata import ExportInfo, build_metadata
from trainer.lora.reading import check_lora_fits, read_lora_file
from trainer.lora.writing import collect_lora_modules, save_kohya_lora
from trainer.models.demo import build_tiny_sd1, build_tiny_sdxl, write_tiny_sdxl
from trainer.train.events import RunFinished, SamplesMade, StepProgress
from trainer.train.loop import train, training_step
from trainer.train.sampling import make_samples
from trainer.train.session import open_session

pytestmark = pytest.mark.usefixtures("one_torch_thread")
STEPS = 80


@pytest.fixture(scope="module")
def xl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_sdxl(tmp_path_factory.mktemp("models") / "tiny-sdxl", seed=0)


@pytest.fixture(scope="module")
def xl_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four captioned images; one is 96x64, so it is cropped into the 64x64 bucket (crop left 16)."""
    return write_captioned_images(tmp_path_factory.mktemp("xl") / "data", [(64, 64)] * 3 + [(96, 64)])


def _config(model: Path, data: Path, out: Path, **overrides):
    return run_config(model, data, out, steps=STEPS, seed=3, **overrides)


def _session(model: Path, data: Path, out: Path, **overrides):
    return open_session(_config(model, data, out, **overrides), lambda level, text: None)


@pytest.fixture(scope="module")
def trained(xl_dir: Path, xl_data: Path, tmp_path_factory: pytest.TempPathFactory) -> list:
    """One real run: UNet (full targets) + both text encoders, a sample image at the end."""
    out = tmp_path_factory.mktemp("xl-run")
    config = _config(xl_dir, xl_data, out, lr=1e-2, te_lr=1e-2, sample_every=STEPS, sample_steps=2,
                     sample_prompts=["zxq, portrait"])
    return list(train(config))


# --- conditioning -----------------------------------------------------------------------------------


def _expected_time_ids(image: Path, side: int = 64) -> list[float]:
    """[original h, original w, crop top, crop left, target h, target w] from the file itself."""
    with Image.open(image) as img:
        width, height = img.size
    scale = side / min(width, height)  # cover the square bucket, then centre-crop
    scaled_w, scaled_h = round(width * scale), round(height * scale)
    return [height, width, (scaled_h - side) // 2, (scaled_w - side) // 2, side, side]


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_conditioning_matches_diffusers_sdxl_pipeline(xl_dir, xl_data, tmp_path, clip_skip):
    """Both encoders' hidden states, the pooled embedding and the size/crop ids, as SDXL expects them."""
    session = _session(xl_dir, xl_data, tmp_path, train_text_encoder=False, clip_skip=clip_skip)
    assert session.model.family == "sdxl" and session.text_cache is not None
    pipe = load_pipeline(xl_dir)
    captions = [item.caption for item in session.training_set.items]
    hidden, pooled = session.text_embeddings_for(captions)
    with torch.no_grad():
        want_hidden, _, want_pooled, _ = pipe.encode_prompt(captions, do_classifier_free_guidance=False,
                                                            clip_skip=clip_skip - 1 or None)
    assert hidden.shape == (4, 77, 32 + 48) and pooled.shape == (4, 48)
    torch.testing.assert_close(hidden, want_hidden)
    torch.testing.assert_close(pooled, want_pooled)

    refs = [SampleRef(i, session.training_set.item_buckets[i], False, 0) for i in range(4)]
    _, time_ids = session.latents_for(refs)
    expected = [_expected_time_ids(item.path) for item in session.training_set.items]
    assert time_ids.tolist() == expected
    assert [64, 96, 0, 16, 64, 64] in expected  # the wide image really is cropped

    # the crop/size conditioning survives the on-disk latent cache: a new session reads it back
    again = _session(xl_dir, xl_data, tmp_path, train_text_encoder=False, clip_skip=clip_skip)
    assert again.latents_for(refs)[1].tolist() == expected and again.latent_cache.encoded == 0


def test_step_zero_is_the_base_model_and_every_part_gets_gradients(xl_dir, xl_data, tmp_path):
    session = _session(xl_dir, xl_data, tmp_path, lr=1e-3)
    assert set(session.trainable_models()) == {"unet", "text_encoder", "text_encoder_2"}
    assert session.text_cache is None  # the encoders train, so their outputs change every step
    base = load_pipeline(xl_dir)
    captions = ["zxq, portrait"]
    g = torch.Generator().manual_seed(0)
    noisy, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500])
    time_ids = torch.tensor([[64.0, 96, 0, 16, 64, 64]])
    with torch.no_grad():
        hidden, pooled = session.text_embeddings_for(captions)
        got = session.model.unet(noisy, t, hidden, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids})
        want_hidden, _, want_pooled, _ = base.encode_prompt(captions, do_classifier_free_guidance=False)
        want = base.unet(noisy, t, want_hidden, added_cond_kwargs={"text_embeds": want_pooled, "time_ids": time_ids})
    assert torch.equal(hidden, want_hidden) and torch.equal(pooled, want_pooled)
    assert torch.equal(got.sample, want.sample)

    loss = training_step(session)
    assert torch.isfinite(loss)
    for name, model in session.trainable_models().items():
        grads = {n: p.grad for n, p in model.named_parameters() if ".lora_B." in n}
        # SDXL reads the first encoder's penultimate layer, so its last layer cannot learn (kohya
        # trains it all the same); the second encoder's last layer feeds the pooled embedding.
        dead = {n for n in grads if name == "text_encoder" and ".layers.1." in n}
        assert grads and all(grads[n] is None for n in dead), name
        assert all(grads[n] is not None and grads[n].abs().sum() > 0 for n in set(grads) - dead), name


def _zero_terminal_snr_alphas_cumprod() -> torch.Tensor:
    """SD's scaled-linear schedule rescaled to zero terminal SNR (Lin et al. 2023, Algorithm 1)."""
    root = scaled_linear_alphas_cumprod().sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * first / (first - last)
    return root ** 2


def test_v_prediction_with_zero_terminal_snr(xl_dir, xl_data, tmp_path, monkeypatch):
    """NoobAI-style: the target is the velocity, and at t = T the input is pure noise (target = -x0)."""
    session = _session(xl_dir, xl_data, tmp_path, prediction_type="v_prediction", zero_terminal_snr=True,
                       train_text_encoder=False)
    alphas_cumprod = _zero_terminal_snr_alphas_cumprod()
    torch.testing.assert_close(session.model.noise_scheduler.alphas_cumprod.double(), alphas_cumprod,
                               rtol=1e-5, atol=1e-7)
    assert session.model.noise_scheduler.alphas_cumprod[-1] == 0
    sampler = make_inference_scheduler(session.model, "dpmpp_2m")  # samples start from pure noise
    assert sampler.config.rescale_betas_zero_snr and sampler.config.timestep_spacing == "trailing"

    for t in (400, 999):
        seen = capture_training_step(monkeypatch, session, [t])
        a = alphas_cumprod[t].float()
        velocity = a.sqrt() * seen["noise"] - (1 - a).sqrt() * seen["latents"]
        torch.testing.assert_close(seen["target"], velocity, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(seen["target"], -seen["latents"])  # t = T: nothing of x0 is left in the input

    sample = make_samples(session, 0)  # trailing timesteps on the rescaled schedule: a finite picture
    with Image.open(sample.paths[0]) as img:
        assert img.size == (64, 64) and np.asarray(img).std() > 0


def test_single_file_sdxl_with_a_v_pred_marker_trains_as_v_prediction(xl_dir, xl_data, tmp_path):
    """An A1111/ComfyUI-layout SDXL file (NoobAI-style ``v_pred`` key) loads bit-identically."""
    from trainer.config.schema import ModelConfig
    from trainer.models.loading import load_base_model
    from trainer.models.single_file import save_single_file

    folder_model = load_base_model(ModelConfig(base=str(xl_dir)), supported=("sdxl",))
    single = save_single_file(folder_model, tmp_path / "tiny-xl-vpred.safetensors", dtype=torch.float32,
                              prediction_type="v_prediction")
    model = load_base_model(ModelConfig(base=str(single), base_config=str(xl_dir)), supported=("sdxl",))
    assert (model.family, model.prediction_type) == ("sdxl", "v_prediction")
    assert_same_weights(model, folder_model, ("unet", "text_encoder", "text_encoder_2"))
    session = _session(single, xl_data, tmp_path, base_config=str(xl_dir))
    assert session.model.noise_scheduler.config.prediction_type == "v_prediction"
    assert torch.isfinite(training_step(session))


def test_zero_terminal_snr_is_refused_for_an_epsilon_model(xl_dir, xl_data, tmp_path):
    with pytest.raises(ConfigError, match="zero_terminal_snr needs a v-prediction model"):
        _session(xl_dir, xl_data, tmp_path, zero_terminal_snr=True)


# --- training, export, loading ---------------------------------------------------------------------


def _eval_loss(pipe, data: Path) -> float:
    """Denoising loss of a pipeline on the square training images at fixed noise and timesteps."""
    images = sorted(p for p in data.glob("*.png") if Image.open(p).size == (64, 64))
    pixels = image_batch(images)
    captions = [p.with_suffix(".txt").read_text(encoding="utf-8") for p in images]
    g = torch.Generator().manual_seed(0)
    total = 0.0
    with torch.no_grad():
        latents = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
        hidden, _, pooled, _ = pipe.encode_prompt(captions, do_classifier_free_guidance=False)
        cond = {"text_embeds": pooled, "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * len(images))}
        for t in (100, 300, 500, 700, 900):
            noise = torch.randn(latents.shape, generator=g)
            timesteps = torch.full((len(images),), t)
            noisy = pipe.scheduler.add_noise(latents, noise, timesteps)
            total += torch.nn.functional.mse_loss(pipe.unet(noisy, timesteps, hidden, added_cond_kwargs=cond).sample,
                                                  noise).item()
    return total / 5


def _sgm(path: str) -> str:
    """diffusers UNet path -> SGM path, written out from DESIGN §4 (not from trainer code)."""
    if m := re.match(r"down_blocks\.(\d)\.attentions\.(\d)\.(.+)", path):
        return f"input_blocks.{3 * int(m[1]) + int(m[2]) + 1}.1.{m[3]}"
    if m := re.match(r"up_blocks\.(\d)\.attentions\.(\d)\.(.+)", path):
        return f"output_blocks.{3 * int(m[1]) + int(m[2])}.1.{m[3]}"
    return path.replace("mid_block.attentions.0.", "middle_block.1.")


def _independent_names(parts) -> dict[str, tuple[str, str]]:
    """kohya name -> (component, module path) for every Linear of the tiny SDXL a LoRA may hold."""
    names = {}
    for path, module in parts.unet.named_modules():
        if isinstance(module, torch.nn.Linear) and ".attentions." in path:
            names["lora_unet_" + _sgm(path).replace(".", "_")] = ("unet", path)
    for prefix, component in (("lora_te1_", "text_encoder"), ("lora_te2_", "text_encoder_2")):
        for path, module in getattr(parts, component).named_modules():
            if isinstance(module, torch.nn.Linear) and ".layers." in path:
                names[prefix + "text_model_" + path.removeprefix("text_model.").replace(".", "_")] = (component, path)
    return names


def _layer(parts, where: tuple[str, str]) -> torch.nn.Module:
    component, path = where
    return getattr(parts, component).get_submodule(path)


def _hand_merged(file: Path):
    """A fresh tiny SDXL with W0 + (alpha/r)·up@down added by hand from the file's tensors."""
    parts = build_tiny_sdxl(seed=0)
    merge_by_hand(file, {name: _layer(parts, where) for name, where in _independent_names(parts).items()})
    return parts


def _outputs(unet, text_encoder, text_encoder_2):
    g = torch.Generator().manual_seed(7)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 9, 80, generator=g)
    cond = {"text_embeds": torch.randn(2, 48, generator=g), "time_ids": torch.tensor([[64.0, 96, 0, 16, 64, 64]] * 2)}
    ids = torch.tensor([[49406, 320, 1125, 539, 49407, 49407]])
    with torch.no_grad():
        return (unet(x, torch.tensor([10, 600]), ctx, added_cond_kwargs=cond).sample, text_encoder(ids)[0],
                text_encoder_2(ids).text_embeds)


def test_training_learns_and_writes_an_sdxl_kohya_file(trained, xl_dir, xl_data):
    finished = trained[-1]
    assert isinstance(finished, RunFinished) and finished.step == STEPS
    progress = [e for e in trained if isinstance(e, StepProgress)]
    assert all(np.isfinite(p.loss) for p in progress)
    samples = [e for e in trained if isinstance(e, SamplesMade)]
    assert len(samples) == 1
    with Image.open(samples[0].paths[0]) as img:
        assert img.size == (64, 64)

    tensors = safetensors.torch.load_file(str(finished.output))
    stems = {k.rsplit(".", 2)[0] for k in tensors if k.endswith(".lora_down.weight")}
    assert all(s.startswith(("lora_unet_", "lora_te1_", "lora_te2_")) for s in stems)
    assert not any(re.search(r"down_blocks|up_blocks|mid_block", s) for s in stems)  # SGM names only
    for stem, down_shape in {
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k": (4, 80),  # cross-attn reads both encoders
        "lora_unet_input_blocks_8_1_transformer_blocks_1_attn1_to_q": (4, 32),  # depth-2 block, second transformer
        "lora_unet_middle_block_1_transformer_blocks_1_ff_net_0_proj": (4, 32),
        "lora_unet_output_blocks_2_1_proj_out": (4, 32),  # 2-D: SDXL's proj_in/out are Linear
        "lora_unet_output_blocks_5_1_proj_in": (4, 32),
        "lora_te1_text_model_encoder_layers_1_self_attn_q_proj": (4, 32),
        "lora_te2_text_model_encoder_layers_1_self_attn_q_proj": (4, 48),
    }.items():
        assert tuple(tensors[f"{stem}.lora_down.weight"].shape) == down_shape, stem
    assert tuple(tensors["lora_unet_output_blocks_2_1_proj_out.lora_up.weight"].shape) == (32, 4)
    assert not any(s.startswith(("lora_unet_input_blocks_1_", "lora_unet_input_blocks_2_")) for s in stems)
    for layer in (0, 1):  # A1111 applies SDXL TE2 layers only with the full q/k/v/out set
        assert {f"lora_te2_text_model_encoder_layers_{layer}_self_attn_{p}" for p in
                ("q_proj", "k_proj", "v_proj", "out_proj")} <= stems
    assert all(float(v) == 2.0 for k, v in tensors.items() if k.endswith(".alpha"))
    for key, up in tensors.items():  # every B moved, except where no gradient reaches (see above)
        if key.endswith("lora_up.weight"):
            assert (torch.count_nonzero(up) == 0) == key.startswith("lora_te1_text_model_encoder_layers_1_"), key

    meta = read_lora_file(finished.output).metadata
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["ss_v2"] == "False" and meta["modelspec.prediction_type"] == "epsilon"

    base_loss = _eval_loss(load_pipeline(xl_dir), xl_data)
    pipe = load_pipeline(xl_dir)
    pipe.load_lora_weights(str(finished.output), adapter_name="trained")
    assert _eval_loss(pipe, xl_data) < 0.95 * base_loss  # ~0.90: attention-only LoRA on a random tiny UNet


def test_diffusers_loads_the_export_as_the_independent_merge(trained, xl_dir):
    """StableDiffusionXLPipeline.load_lora_weights: no warning, and W0 + (alpha/r)·BA on all three parts."""
    output = trained[-1].output
    pipe = load_pipeline(xl_dir)
    base = _outputs(pipe.unet, pipe.text_encoder, pipe.text_encoder_2)
    with library_warnings() as messages:
        pipe.load_lora_weights(str(output), adapter_name="exported")
    assert messages == []
    merged = _hand_merged(output)
    loaded = _outputs(pipe.unet, pipe.text_encoder, pipe.text_encoder_2)
    want = _outputs(merged.unet, merged.text_encoder, merged.text_encoder_2)
    for got, expected, before in zip(loaded, want, base):
        effect = (expected - before).abs().max().item()
        assert effect > 0.1  # the LoRA really changes each part, so a wrong scale or name could not pass
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-4 * effect)


def _sd1_lora(path: Path) -> Path:
    """A small SD1 LoRA file (tiny SD1 model, random LoRA weights)."""
    from trainer.config.schema import NetworkConfig
    from trainer.lora.inject import inject_lora, plan_lora

    parts = build_tiny_sd1()
    network = NetworkConfig(rank=2, alpha=2, train_text_encoder=False)
    plan = plan_lora(network, parts.unet, {})
    inject_lora(parts.unet, plan.modules["unet"], network)
    for name, p in parts.unet.named_parameters():
        if ".lora_B." in name:
            p.data.normal_()
    save_kohya_lora(collect_lora_modules("unet", parts.unet, "sd1"),
                    build_metadata(ExportInfo(family="sd1", output_name=path.stem, rank=2, alpha=2)), path)
    return path


def test_family_is_detected_and_a_mismatch_is_refused(trained, xl_dir, tmp_path):
    from trainer.config.schema import ModelConfig
    from trainer.generate.generator import Generator
    from trainer.generate.requests import GenerationRequest, LoraSpec
    from trainer.models.loading import load_base_model

    xl_file = read_lora_file(trained[-1].output)
    assert xl_file.family == "sdxl"
    check_lora_fits(xl_file, "sdxl")
    with pytest.raises(LoraFileError, match=r"made for SDXL but the loaded model is SD 1\.x"):
        check_lora_fits(xl_file, "sd1")

    sd1_path = _sd1_lora(tmp_path / "sd1-style.safetensors")
    assert read_lora_file(sd1_path).family == "sd1"
    generator = Generator(load_base_model(ModelConfig(base=str(xl_dir)), supported=("sdxl",)), device="cpu")
    with pytest.raises(LoraFileError, match=r"made for SD 1\.x but the loaded model is SDXL"):
        generator.prepare(GenerationRequest("zxq", loras=(LoraSpec(sd1_path),)))
    assert generator.prepare(GenerationRequest("zxq", loras=(LoraSpec(trained[-1].output),))) == []


def _delta(tensors: dict[str, torch.Tensor], stem: str) -> torch.Tensor:
    down, up = tensors[f"{stem}.lora_down.weight"].double(), tensors[f"{stem}.lora_up.weight"].double()
    return (tensors[f"{stem}.alpha"].double() / down.shape[0] * up @ down).float()


def _effective_weight(layer: torch.nn.Module) -> torch.Tensor:
    """The weight a Linear's live forward applies (peft adapters or fused weights alike)."""
    base = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
    with torch.no_grad():
        return (layer(torch.eye(base.in_features)) - (0 if base.bias is None else base.bias)).T


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
def test_generator_mixes_two_sdxl_loras_exactly_and_renders(trained, xl_dir, tmp_path, fuse):
    """W = W0 + 0.7·ΔW1 - 0.5·ΔW2 on the UNet and both encoders, then an SDXL image with both
    (fused into the weights, or unfused: packed into one low-rank product per layer)."""
    from trainer.generate.generator import Generator
    from trainer.generate.requests import GenerationRequest, LoraSpec
    from trainer.lora.reading import LoraModule

    generator = Generator.from_base(str(xl_dir), device="cpu", fuse=fuse)
    model = generator.model
    names = _independent_names(model)
    first_path = trained[-1].output
    first = safetensors.torch.load_file(str(first_path))
    g = torch.Generator().manual_seed(11)
    second_names = [n for n in names if n.endswith(("attn2_to_k", "attn2_to_v"))
                    or n.startswith("lora_te2_text_model_encoder_layers_0_self_attn_")]
    second_modules = []
    for name in second_names:
        out_features, in_features = _layer(model, names[name]).weight.shape
        second_modules.append(LoraModule(name, torch.randn(2, in_features, generator=g) * 0.3,
                                         torch.randn(out_features, 2, generator=g) * 0.3, 3.0))
    second_path = tmp_path / "second.safetensors"
    save_kohya_lora(second_modules, build_metadata(ExportInfo(family="sdxl", output_name="second", rank=2, alpha=3)),
                    second_path, dtype="fp32")
    second = safetensors.torch.load_file(str(second_path))
    stems = {k.rsplit(".", 2)[0] for k in [*first, *second] if k.endswith(".lora_down.weight")}
    base = {stem: _layer(model, names[stem]).weight.detach().clone() for stem in stems}

    specs = (LoraSpec(first_path, 0.7), LoraSpec(second_path, -0.5))
    request = GenerationRequest("zxq, portrait", steps=2, width=64, height=64, seed=5, loras=specs)
    assert generator.prepare(request) == []
    generator.apply(specs)
    for stem in sorted(stems):
        want = base[stem].clone()
        if f"{stem}.alpha" in first:
            want += 0.7 * _delta(first, stem)
        if f"{stem}.alpha" in second:
            want -= 0.5 * _delta(second, stem)
        torch.testing.assert_close(_effective_weight(_layer(model, names[stem])), want, atol=1e-5, rtol=1e-5,
                                   msg=stem)
    images = generator.generate(request)
    assert len(images) == 1 and images[0].image.size == (64, 64)
    assert "<lora:lora:0.7>" in images[0].infotext.prompt and "<lora:second:-0.5>" in images[0].infotext.prompt
