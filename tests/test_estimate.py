"""The memory/time estimate the Train tab shows before launch: behaves like the real cost does.

No wall-clock assertions: only directions (more pixels, a bigger batch or rank cost more),
precision effects and plausible SD 1.5 numbers, all computed from shapes on the meta device.
"""

from __future__ import annotations

import pytest

from trainer.config.presets import resolve_config
from trainer.train.estimate import Estimate, Estimator, estimate_run
from trainer.train.step_profile import model_arch

GiB = 1024**3


def estimate(model, device="cuda", num_images=20, **overrides) -> Estimate:
    """``model``: an Estimator (reuses its shape counts) or anything ``estimate_run`` takes."""
    settings = {"resolution": 512, "batch_size": 1, "rank": 32, "targets": "cross-attn", "train_text_encoder": False,
                "precision": "fp16", "epochs": 10}
    settings.update(overrides)
    config = resolve_config(None, None, settings)
    if isinstance(model, Estimator):
        return model.estimate(config, device=device, num_images=num_images)
    return estimate_run(config, model, device=device, num_images=num_images)


@pytest.fixture(scope="module")
def sd15() -> Estimator:
    return Estimator("sd15")


@pytest.mark.parametrize("setting, smaller, larger", [
    ("resolution", 256, 512),
    ("batch_size", 1, 4),
    ("rank", 8, 128),
])
def test_more_pixels_images_or_rank_need_more_memory_and_time(sd15, setting, smaller, larger):
    small, large = estimate(sd15, **{setting: smaller}), estimate(sd15, **{setting: larger})
    assert large.peak_memory_bytes > small.peak_memory_bytes
    assert large.step_seconds > small.step_seconds


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_half_precision_needs_less_memory_than_fp32(sd15, device):
    fp32 = estimate(sd15, device=device, precision="fp32")
    for half in ("fp16", "bf16"):
        assert estimate(sd15, device=device, precision=half).peak_memory_bytes < 0.75 * fp32.peak_memory_bytes


def test_sd15_at_512_on_a_gpu_is_in_the_range_people_see():
    run = estimate("sd15", device="cuda", targets="cross-attn", train_text_encoder=True)
    # fp16 UNet (1.7 GB) + trained text encoder, plus activations (the fp32 VAE waits in host memory
    # once the latents are cached): a 6 GB card trains SD 1.5 at 512 px.
    assert 2.5 * GiB < run.peak_memory_bytes < 6 * GiB
    assert run.breakdown["weights"] == pytest.approx(1.97 * GiB, rel=0.1)
    assert run.total_steps == 200  # 20 images x 10 epochs / batch 1
    assert 0.02 < run.step_seconds < 2.0  # somewhere between a fast and a slow GPU


def test_sd15_at_512_in_fp32_on_a_cpu(sd15):
    run = estimate(sd15, device="cpu", precision="fp32")
    assert 5 * GiB < run.peak_memory_bytes < 9 * GiB
    assert 2.0 < run.step_seconds < 120.0
    assert run.total_seconds == pytest.approx(run.caching_seconds + 200 * run.step_seconds)
    assert run.caching_seconds > 0


def test_wider_target_sets_and_text_encoder_training_cost_more(sd15):
    cross, attn, full = (estimate(sd15, targets=t) for t in ("cross-attn", "attn", "full"))
    assert cross.breakdown["lora_state"] < attn.breakdown["lora_state"] < full.breakdown["lora_state"]
    assert cross.peak_memory_bytes < attn.peak_memory_bytes < full.peak_memory_bytes
    with_te = estimate(sd15, targets="cross-attn", train_text_encoder=True)
    assert with_te.step_seconds > cross.step_seconds
    assert with_te.peak_memory_bytes > cross.peak_memory_bytes


def test_caching_latents_makes_steps_cheaper_but_costs_time_up_front(sd15):
    cached = estimate(sd15, cache_latents=True)
    uncached = estimate(sd15, cache_latents=False, cache_text=False)
    assert uncached.step_seconds > cached.step_seconds
    assert cached.caching_seconds > 0 and uncached.caching_seconds == 0


def test_gradient_checkpointing_trades_time_for_memory(sd15):
    plain, checkpointed = estimate(sd15), estimate(sd15, grad_checkpointing=True)
    assert checkpointed.peak_memory_bytes < plain.peak_memory_bytes
    assert checkpointed.step_seconds > plain.step_seconds


def test_steps_setting_wins_over_epochs(sd15):
    run = estimate(sd15, steps=50, num_images=None)
    assert run.total_steps == 50
    unknown = estimate(sd15, num_images=None)
    assert unknown.total_steps == 0 and unknown.total_seconds == 0  # epochs without a dataset size: no total


def test_a_loaded_model_is_measured_by_its_own_shapes(tiny_sd1_dir):
    from trainer.config.schema import ModelConfig
    from trainer.models.loading import load_base_model

    tiny = load_base_model(ModelConfig(base=str(tiny_sd1_dir)))
    assert model_arch(tiny).unet_config["block_out_channels"] == [32, 64] or \
        tuple(model_arch(tiny).unet_config["block_out_channels"]) == (32, 64)
    small = estimate(tiny, device="cpu", precision="fp32", resolution=64)
    assert small.peak_memory_bytes < 0.1 * GiB
    assert estimate(tiny_sd1_dir, device="cpu", precision="fp32", resolution=64).peak_memory_bytes == \
        small.peak_memory_bytes  # a diffusers folder gives the same answer without loading weights


def test_sdxl_unet_only_at_1024_is_larger_than_sd15():
    sdxl = estimate("sdxl", device="cuda", resolution=1024, targets="attn", train_text_encoder=False)
    sd15 = estimate("sd15", device="cuda", resolution=512, targets="attn", train_text_encoder=False)
    assert sdxl.peak_memory_bytes > 2 * sd15.peak_memory_bytes
    assert sdxl.peak_memory_bytes < 24 * GiB


def test_unknown_architecture_is_a_clear_error():
    with pytest.raises(ValueError, match="bundled name"):
        model_arch(object())


def test_on_a_gpu_the_models_whose_outputs_are_cached_leave_its_memory(sd15):
    """The VAE (fp32, 0.31 GB) and the frozen fp16 text encoder (0.23 GB) are parked during the steps;
    the caching phase, with them on the GPU and the VAE encoding, is a peak of its own."""
    cached = estimate(sd15, device="cuda", precision="fp16", cache_latents=True, cache_text=True)
    uncached = estimate(sd15, device="cuda", precision="fp16", cache_latents=False, cache_text=False)
    parked = uncached.breakdown["weights"] - cached.breakdown["weights"]
    assert parked == pytest.approx(0.31 * GiB + 0.23 * GiB, rel=0.05)
    assert cached.breakdown["caching_phase"] > cached.breakdown["weights"]
    assert cached.peak_memory_bytes >= cached.breakdown["caching_phase"]
    assert uncached.breakdown["caching_phase"] == 0
    on_cpu = [estimate(sd15, device="cpu", cache_latents=c, cache_text=c).breakdown["weights"] for c in (True, False)]
    assert on_cpu[0] == on_cpu[1], "nothing is parked on a CPU: host memory is where everything already is"


def test_sdxl_at_1024_with_checkpointing_fits_a_10_gb_budget():
    """Issue 6's lean goal, as predicted (bf16, UNet-only LoRA, cached text embeddings and latents)."""
    run = estimate("sdxl", device="cuda", precision="bf16", resolution=1024, grad_checkpointing=True,
                   train_text_encoder=False)
    assert run.peak_memory_bytes < 10 * GiB
    assert run.breakdown["weights"] == pytest.approx(2.57e9 * 2, rel=0.05)  # the bf16 UNet alone


@pytest.mark.parametrize(("free_gib", "checkpointing", "level", "words"), [
    (24, False, "info", ""),  # fits as it is: checkpointing would only cost time
    (12, True, "info", "Gradient checkpointing turned on"),  # needs ~15.6 GB without, ~9 GB with
    (6, True, "warning", "may not fit"),  # not even with it: the notice says what to lower
])
def test_checkpointing_is_turned_on_only_when_the_run_would_not_fit_without_it(free_gib, checkpointing, level, words):
    from trainer.train.estimate import checkpointing_for_memory

    config = resolve_config(None, None, {"resolution": 1024, "train_text_encoder": False, "precision": "bf16",
                                         "targets": "attn", "rank": 32})
    plan = checkpointing_for_memory(Estimator("sdxl"), config, int(free_gib * GiB))
    assert plan.checkpointing is checkpointing and plan.level == level
    assert words in plan.notice and (plan.notice == "") is (words == "")
    if level == "warning":
        assert "Lower the resolution" in plan.notice


def test_checkpointing_asked_for_is_kept_whatever_the_memory():
    from trainer.train.estimate import checkpointing_for_memory

    config = resolve_config(None, None, {"grad_checkpointing": True})
    assert checkpointing_for_memory(Estimator("sd15"), config, 80 * GiB) == (True, "", "info")


def test_a_session_counts_the_memory_it_already_holds_as_its_own(tiny_sd1_dir, monkeypatch):
    """The weights are on the GPU before the plan is made: free memory + what this process holds is
    the budget (the estimate includes those weights), else every run would look too big."""
    import torch

    from trainer.config.schema import ModelConfig
    from trainer.models.loading import load_base_model
    from trainer.train.session import use_checkpointing

    model = load_base_model(ModelConfig(base=str(tiny_sd1_dir)))
    config = resolve_config(None, None, {"base": str(tiny_sd1_dir), "resolution": 64, "device": "cuda"})
    need = Estimator(model).estimate(config, device="cuda", resolution=64).peak_memory_bytes
    notices = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (need // 4, 80 * GiB))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: need)
    assert use_checkpointing(config, model, torch.device("cuda"), 64, lambda *n: notices.append(n)) is False
    assert notices == []
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)
    assert use_checkpointing(config, model, torch.device("cuda"), 64, lambda *n: notices.append(n)) is True
    assert notices and notices[0][0] in ("info", "warning")
    assert use_checkpointing(config, model, torch.device("cpu"), 64, pytest.fail) is False, "a CPU never plans"
