"""What the end-to-end tests of each model family (SD 2.x, SDXL, SD1 formats) check the same way.

A short run's config, one training step with its latents, noise and loss target captured, the
scaled-linear schedule written out by hand, a kohya file merged into a model by hand (DESIGN §4,
not the trainer's code), a diffusers pipeline loaded from a tiny model folder, and two runs' LoRA
files compared (a resumed run against the same run left alone).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image
from safetensors.torch import load_file

from trainer.config.presets import resolve_config
from trainer.config.schema import StudioConfig


def run_config(model: Path, data: Path, out: Path, *, steps: int, seed: int, **overrides) -> StudioConfig:
    """The character preset at rank 4 / alpha 2 on every transformer Linear, no min-SNR weighting."""
    settings = {"base": str(model), "data": str(data), "output": str(out / "lora.safetensors"), "rank": 4, "alpha": 2,
                "steps": steps, "seed": seed, "min_snr_gamma": 0.0, "targets": "full"}
    return resolve_config("character", overrides={**settings, **overrides})


def run_events(config: StudioConfig, stop_after: int | None = None) -> list:
    """Every event of a training run of ``config``, stopped (as Stop does) after step ``stop_after``."""
    from trainer.train.events import RunCommands, StepProgress
    from trainer.train.loop import train

    commands, events = RunCommands(), []
    for event in train(config, commands):
        events.append(event)
        if stop_after is not None and isinstance(event, StepProgress) and event.step == stop_after:
            commands.stop()
    return events


def load_pipeline(model_dir: Path):
    """The diffusers pipeline model_index.json names (StableDiffusionPipeline, StableDiffusionXLPipeline)."""
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(str(model_dir), local_files_only=True)


def capture_training_step(monkeypatch: pytest.MonkeyPatch, session, timesteps: list[int]) -> dict:
    """Run one training step at fixed timesteps; return its latents, time ids, noise and loss target."""
    from trainer.train import loop
    from trainer.train.loop import training_step

    seen: dict = {}
    latents_for = session.latents_for

    def record_latents(refs):
        seen["latents"], seen["time_ids"] = latents_for(refs)
        return seen["latents"], seen["time_ids"]

    def record_noise(latents, train, generator):
        seen["noise"] = torch.randn(latents.shape, generator=generator)
        return seen["noise"]

    def record_loss(prediction, target, scheduler, t, train, **weights):
        seen["target"] = target.detach().clone()
        return torch.nn.functional.mse_loss(prediction, target)

    monkeypatch.setattr(session, "latents_for", record_latents)
    monkeypatch.setattr(loop, "sample_noise", record_noise)
    monkeypatch.setattr(loop, "sample_timesteps", lambda n, T, train, g, device: torch.tensor(timesteps[:n]))
    monkeypatch.setattr(loop, "diffusion_loss", record_loss)
    training_step(session)
    return seen


def scaled_linear_alphas_cumprod() -> torch.Tensor:
    """SD's scaled-linear schedule (betas 0.00085 to 0.012), written out rather than taken from a scheduler."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


def merge_by_hand(file: Path, layers: Mapping[str, torch.nn.Module]) -> set[str]:
    """Add (alpha/r)·up@down from a kohya file into each named layer's weight; returns the file's names.

    ``layers`` maps kohya names to modules, built by the caller from DESIGN §4; every name in the
    file must be one of them (a name the test did not expect fails here).
    """
    state = safetensors.torch.load_file(str(file))
    stems = {k.rsplit(".", 2)[0] for k in state if k.endswith(".lora_down.weight")}
    assert stems <= set(layers), sorted(stems - set(layers))[:3]
    with torch.no_grad():
        for stem in stems:
            weight = layers[stem].weight
            down, up = state[f"{stem}.lora_down.weight"].float(), state[f"{stem}.lora_up.weight"].float()
            alpha = state[f"{stem}.alpha"].float().item()
            weight += (alpha / down.shape[0]) * (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)
    return stems


def assert_same_weights(model, reference, parts: tuple[str, ...]) -> None:
    """Each named part of ``model`` holds exactly ``reference``'s tensors under the same names."""
    for part in parts:
        loaded, original = getattr(model, part).state_dict(), getattr(reference, part).state_dict()
        assert loaded.keys() == original.keys() and all(torch.equal(loaded[k], original[k]) for k in loaded), part


def sd_outputs(unet, text_encoder, *, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed-noise outputs of a tiny SD1/SD2 UNet (32-wide context) and text encoder, to compare two models.

    ``pad_id``: 49407 (SD1's CLIP pads with the end token) or 0 (SD 2.x's OpenCLIP pads with "!").
    """
    g = torch.Generator().manual_seed(7)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 9, 32, generator=g)
    ids = torch.tensor([[49406, 320, 1125, 539, 49407, pad_id]])
    with torch.no_grad():
        return unet(x, torch.tensor([10, 600]), ctx).sample, text_encoder(ids)[0]


def image_batch(images: list[Path]) -> torch.Tensor:
    """RGB files as one [N, 3, H, W] batch in [-1, 1], as the VAE takes them."""
    return torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1).float() / 127.5 - 1
                        for p in images])


def assert_same_lora(reference: Path, other: Path) -> None:
    """Same tensor names, values equal up to the float noise of a resumed run (fp16 export)."""
    x, y = load_file(reference), load_file(other)
    assert x.keys() == y.keys()
    for key in x:
        torch.testing.assert_close(y[key].float(), x[key].float(), rtol=1e-3, atol=1e-5, msg=key)
