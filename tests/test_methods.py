"""Training methods on small modules: kohya's dropouts, EMA, LoRA+ groups, lr cycles, their settings."""

from __future__ import annotations

import pytest
import torch
from tiny_runs import run_events

from trainer.config.presets import resolve_config
from trainer.config.schema import NetworkConfig
from trainer.core.errors import CheckpointError, ConfigError
from trainer.lora.dropout import KohyaDropout, attach_kohya_dropout
from trainer.lora.inject import ADAPTER_NAME, inject_lora, lora_layers, lora_parameters
from trainer.lora.metadata import ExportInfo, TrainingMethods, build_metadata
from trainer.train.checkpoints import load_checkpoint, save_checkpoint
from trainer.train.ema import LoraEma, ema_decay_at
from trainer.train.optim import build_lr_scheduler, lora_param_groups, schedule_notice

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BASE = {"base": "x", "data": "x", "output": "x.safetensors"}


def _config(**overrides):
    return resolve_config(None, None, {**BASE, **overrides})


class _Tiny(torch.nn.Module):
    """A Linear on [B, T, C] tokens and a 1x1 conv on [B, C, H, W] maps, as in the UNet and text encoder."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(6, 5)
        self.conv = torch.nn.Conv2d(6, 5, 1)

    def forward(self, tokens: torch.Tensor, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.proj(tokens), self.conv(image)


def _lora_model(**dropouts) -> _Tiny:
    torch.manual_seed(0)
    model = _Tiny()
    network = NetworkConfig(rank=4, alpha=2, **dropouts)
    inject_lora(model, ["proj", "conv"], network)
    attach_kohya_dropout(model, network)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B[ADAPTER_NAME].weight.normal_()
    return model


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(3, 7, 6, generator=g), torch.randn(3, 6, 4, 4, generator=g)


def _by_hand(model: _Tiny, tokens: torch.Tensor, image: torch.Tensor, lora_share: float = 1.0):
    """W0·x + share·(alpha/r)·B·A·x computed from the layers' weights, not through their forward."""
    outputs = []
    for layer, x in ((model.proj, tokens), (model.conv, image)):
        base = layer.get_base_layer()
        down, up = layer.lora_A[ADAPTER_NAME].weight.flatten(1), layer.lora_B[ADAPTER_NAME].weight.flatten(1)
        delta = 0.5 * up @ down  # alpha/r = 2/4
        weight = base.weight.flatten(1) + lora_share * delta
        if x.ndim == 3:
            outputs.append(x @ weight.T + base.bias)
        else:
            outputs.append(torch.einsum("oc,bchw->bohw", weight, x) + base.bias.view(1, -1, 1, 1))
    return tuple(outputs)


DROPOUTS = [
    pytest.param({"network_dropout": 0.5}, 1.0, id="neuron"),
    pytest.param({"rank_dropout": 0.5}, 1.0, id="rank"),
    pytest.param({"module_dropout": 0.5}, 0.5, id="module"),  # kohya does not rescale kept modules
]


@pytest.mark.parametrize(("dropouts", "expected_share"), DROPOUTS)
def test_dropout_changes_training_forwards_only_and_averages_as_kohya_defines(dropouts: dict, expected_share: float):
    model = _lora_model(**dropouts)
    tokens, image = _inputs()
    model.eval()
    with torch.no_grad():
        evaluated = model(tokens, image)
    for got, want in zip(evaluated, _by_hand(model, tokens, image)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # eval: exactly base + delta

    model.train()
    torch.manual_seed(3)
    with torch.no_grad():
        if "module_dropout" in dropouts:  # one decision per forward: average over forwards
            runs = [model(tokens, image) for _ in range(1000)]
            trained = tuple(torch.stack([r[part] for r in runs]).mean(0) for part in range(2))
            first = runs[0]
        else:  # one decision per sample (rank) or value (neuron): average over copies of the batch
            copies = 1000
            out = model(tokens.repeat(copies, 1, 1), image.repeat(copies, 1, 1, 1))
            trained = tuple(o.view(copies, 3, *o.shape[1:]).mean(0) for o in out)
            first = tuple(o[:3] for o in out)
    for part in range(2):
        assert not torch.allclose(first[part], evaluated[part], atol=1e-4), "training forwards must differ"
        expected = _by_hand(model, tokens, image, expected_share)[part]
        scale = (evaluated[part] - _by_hand(model, tokens, image, 0.0)[part]).abs().mean()
        assert (trained[part] - expected).abs().mean() < 0.05 * scale, "the expectation over the masks"


def test_module_dropout_gives_either_the_frozen_layer_or_the_whole_lora():
    model = _lora_model(module_dropout=0.5)
    tokens, image = _inputs()
    full, frozen = _by_hand(model, tokens, image), _by_hand(model, tokens, image, 0.0)
    torch.manual_seed(0)
    seen = set()
    with torch.no_grad():
        for _ in range(20):
            out = model(tokens, image)[0]
            if torch.allclose(out, frozen[0], atol=1e-5):
                seen.add("skipped")
            else:
                torch.testing.assert_close(out, full[0], rtol=1e-5, atol=1e-5)
                seen.add("kept")
    assert seen == {"skipped", "kept"}


@pytest.mark.parametrize(("conv", "shape", "ranks_dim"), [(False, (4, 7, 8), 2), (True, (4, 8, 3, 3), 1)])
def test_rank_dropout_masks_each_sample_and_rank_across_all_positions(conv: bool, shape: tuple, ranks_dim: int):
    down = torch.nn.Conv2d(2, 8, 1) if conv else torch.nn.Linear(2, 8)
    torch.manual_seed(0)
    out = KohyaDropout(rank=0.25)(down, (), torch.ones(shape))
    assert out.unique().tolist() == [0.0, pytest.approx(1 / 0.75)]  # dropped, or kept and rescaled
    per_rank = out.movedim(ranks_dim, 1).flatten(2)  # [B, r, positions]
    assert torch.equal(per_rank.amin(2), per_rank.amax(2)), "one decision per (sample, rank)"
    assert not torch.equal(per_rank[0, :, 0], per_rank[1, :, 0]), "samples draw their own masks"
    down.eval()
    assert KohyaDropout(rank=0.25)(down, (), torch.ones(shape)) is None  # eval: output untouched


def test_no_dropout_attaches_no_hook():
    model = _Tiny()
    inject_lora(model, ["proj", "conv"], NetworkConfig(rank=2))
    assert attach_kohya_dropout(model, NetworkConfig(rank=2)) == 0
    assert attach_kohya_dropout(model, NetworkConfig(rank=2, rank_dropout=0.1)) == 2


# --- EMA ---------------------------------------------------------------------------------------


def test_ema_by_hand_over_three_steps():
    weight = torch.nn.Parameter(torch.zeros(2))
    ema = LoraEma([weight], decay=0.999)
    for value in (1.0, 3.0, 5.0):
        with torch.no_grad():
            weight.fill_(value)
        ema.update()
        if value == 1.0:
            torch.testing.assert_close(ema.shadow[0], torch.full((2,), 1.0))  # decay 0 at the first step: a copy
        if value == 3.0:  # decay min(0.999, 2/11)
            torch.testing.assert_close(ema.shadow[0], torch.full((2,), 2 / 11 * 1 + 9 / 11 * 3))
    torch.testing.assert_close(ema.shadow[0], torch.full((2,), 0.25 * 29 / 11 + 0.75 * 5))  # decay 3/12
    assert [ema_decay_at(k, 0.1) for k in (1, 2, 3)] == [0.0, 0.1, 0.1]  # the configured decay caps the ramp
    assert ema.shadow[0].dtype == torch.float32


def test_ema_weights_are_swapped_in_and_always_restored():
    weight = torch.nn.Parameter(torch.ones(3))
    ema = LoraEma([weight], decay=0.5)
    ema.shadow[0].fill_(7.0)
    with ema.applied():
        assert torch.equal(weight.detach(), torch.full((3,), 7.0))
    assert torch.equal(weight.detach(), torch.ones(3))
    with pytest.raises(RuntimeError), ema.applied():
        raise RuntimeError("sampling failed")
    assert torch.equal(weight.detach(), torch.ones(3))


def test_ema_state_round_trips_through_a_pickle_free_checkpoint(tmp_path):
    params = [torch.nn.Parameter(torch.randn(4, 2)), torch.nn.Parameter(torch.randn(3))]
    ema = LoraEma(params, decay=0.9)
    for _ in range(3):
        with torch.no_grad():
            params[0].add_(1.0)
        ema.update()
    path = save_checkpoint(tmp_path, 3, {"ema": ema.state_dict()}, keep_last=1)
    restored = LoraEma(params, decay=0.9)
    restored.load_state_dict(load_checkpoint(path)[1]["ema"])
    assert restored.updates == 3 and all(torch.equal(a, b) for a, b in zip(restored.shadow, ema.shadow))
    with pytest.raises(CheckpointError, match="EMA weights do not fit"):
        LoraEma(params[:1], decay=0.9).load_state_dict(ema.state_dict())


# --- LoRA+ and learning-rate schedules ---------------------------------------------------------


def test_loraplus_puts_every_b_matrix_in_a_group_of_its_own_lr():
    unet, text_encoder = _Tiny(), _Tiny()
    for module in (unet, text_encoder):
        inject_lora(module, ["proj", "conv"], NetworkConfig(rank=2))
    config = _config(lr=1e-4, te_lr=5e-5, loraplus_ratio=16)
    groups = lora_param_groups({"unet": unet, "text_encoder": text_encoder}, config)
    assert [g["lr"] for g in groups] == [pytest.approx(x) for x in (1e-4, 16e-4, 5e-5, 80e-5)]
    for group, model, part in zip(groups, (unet, unet, text_encoder, text_encoder), "ABAB"):
        expected = [getattr(layer, f"lora_{part}")[ADAPTER_NAME].weight for layer in lora_layers(model).values()]
        assert [id(p) for p in group["params"]] == [id(p) for p in expected]

    plain = lora_param_groups({"unet": unet, "text_encoder": text_encoder}, _config(lr=1e-4, te_lr=5e-5))
    assert [g["lr"] for g in plain] == [1e-4, 5e-5]  # without LoRA+: one group per component, as before
    assert [id(p) for p in plain[0]["params"]] == [id(p) for p in lora_parameters(unet)]


def _lrs(config, steps: int) -> list[float]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=config.optim.lr)
    scheduler = build_lr_scheduler(config, optimizer, steps)
    lrs = []
    for _ in range(steps):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return lrs


@pytest.mark.parametrize(("cycles", "warmup"), [(1, 0), (3, 0), (4, 6)])
def test_cosine_with_restarts_restarts_from_the_peak_once_per_cycle(cycles: int, warmup: int):
    config = _config(lr=1.0, scheduler="cosine_with_restarts", lr_cycles=cycles, warmup_steps=warmup)
    lrs = _lrs(config, warmup + 24)
    after_warmup = lrs[warmup:]
    jumps = [i for i in range(1, len(after_warmup)) if after_warmup[i] > after_warmup[i - 1]]
    assert jumps == [24 // cycles * k for k in range(1, cycles)], "a restart at the start of each new cycle"
    for start in [0, *jumps]:
        assert after_warmup[start] == pytest.approx(1.0)
    assert lrs[:warmup] == [pytest.approx(i / warmup) for i in range(warmup)]
    assert bool(schedule_notice(config)) == (cycles == 1)


@pytest.mark.parametrize(("overrides", "field"), [
    ({"network_dropout": 1.0}, "network.network_dropout"),
    ({"rank_dropout": -0.1}, "network.rank_dropout"),
    ({"module_dropout": 1.5}, "network.module_dropout"),
    ({"lr_cycles": 0, "scheduler": "cosine_with_restarts"}, "optim.lr_cycles"),
    ({"lr_cycles": 3, "scheduler": "cosine"}, "optim.lr_cycles"),
    ({"loraplus_ratio": -1}, "optim.loraplus_ratio"),
    ({"ema_decay": 1.0}, "optim.ema_decay"),
    ({"ema_decay": -0.5}, "optim.ema_decay"),
    ({"ema_export_raw": True}, "output.ema_export_raw"),
    ({"huber_c": 0.0}, "train.huber_c"),
    ({"huber_c": 2.0, "huber_schedule": "exponential"}, "train.huber_c"),
    ({"huber_scale": 0.0}, "train.huber_scale"),
    ({"v_pred_like_loss": -1}, "train.v_pred_like_loss"),
    ({"v_pred_like_loss": 0.1, "zero_terminal_snr": True}, "train.v_pred_like_loss"),
    ({"timestep_sampling": "range", "min_timestep": 500, "max_timestep": 400}, "train.max_timestep"),
    ({"timestep_sampling": "range", "max_timestep": 1001}, "train.max_timestep"),
    ({"min_timestep": 100}, "train.min_timestep"),  # uniform sampling ignores bounds: say so
    ({"logit_std": 0.0}, "train.logit_std"),
    ({"multires_noise_iterations": -1}, "train.multires_noise_iterations"),
    ({"multires_noise_discount": 0.0}, "train.multires_noise_discount"),
    ({"ip_noise_gamma": -0.1}, "train.ip_noise_gamma"),
])
def test_method_settings_out_of_range_name_the_field(overrides: dict, field: str):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")) as caught:
        _config(**overrides)
    assert caught.value.hint


def test_loss_choices_are_checked_against_the_model_kind():
    from trainer.train.loss_weighting import check_prediction_type_options

    with pytest.raises(ConfigError, match="for v-prediction models"):
        check_prediction_type_options(_config(scale_v_pred_loss_like_noise_pred=True).train, "epsilon", "m")
    with pytest.raises(ConfigError, match="for epsilon models"):
        check_prediction_type_options(_config(v_pred_like_loss=0.2).train, "v_prediction", "m")
    check_prediction_type_options(_config(v_pred_like_loss=0.2).train, "epsilon", "m")


def test_metadata_records_the_methods_in_kohyas_keys():
    methods = TrainingMethods(loss_type="huber", huber_schedule="exponential", huber_c=0.2, network_dropout=0.1,
                              rank_dropout=0.25, loraplus_ratio=16, multires_noise_iterations=6, ema_decay=0.999)
    meta = build_metadata(ExportInfo(family="sd1", output_name="x", rank=4, alpha=2, network_dropout=0.1, methods=methods))
    assert {k: meta[k] for k in ("ss_loss_type", "ss_huber_schedule", "ss_huber_c", "ss_huber_scale",
                                 "ss_network_dropout", "ss_multires_noise_iterations", "ss_multires_noise_discount",
                                 "ss_ip_noise_gamma", "ss_debiased_estimation", "lorastudio_ema_decay")} == {
        "ss_loss_type": "huber", "ss_huber_schedule": "exponential", "ss_huber_c": "0.2", "ss_huber_scale": "1.0",
        "ss_network_dropout": "0.1", "ss_multires_noise_iterations": "6", "ss_multires_noise_discount": "0.3",
        "ss_ip_noise_gamma": "None", "ss_debiased_estimation": "False", "lorastudio_ema_decay": "0.999"}
    import json

    args = json.loads(meta["ss_network_args"])
    assert (args["rank_dropout"], args["loraplus_lr_ratio"]) == ("0.25", "16") and "module_dropout" not in args
    assert all(isinstance(v, str) for v in meta.values())


# --- tiny runs with the methods on -------------------------------------------------------------

METHODS = dict(loss="huber", huber_schedule="snr", debiased_estimation=True, timestep_sampling="logit_normal",
               multires_noise_iterations=3, ip_noise_gamma=0.1, network_dropout=0.1, rank_dropout=0.1,
               module_dropout=0.1, loraplus_ratio=4.0)


def test_a_run_with_the_methods_on_learns(tiny_sd1_dir, image_folder, tmp_path):
    """Huber loss, debiased weights, logit-normal timesteps, multires and input noise, the three
    dropouts and LoRA+ together still fit the training images (the file loads in diffusers)."""
    from test_training import _eval_loss, _pipeline
    from tiny_runs import run_config

    config = run_config(tiny_sd1_dir, image_folder, tmp_path, steps=30, seed=3, lr=4e-3, te_lr=4e-3, **METHODS)
    finished = run_events(config)[-1]
    base_loss = _eval_loss(_pipeline(tiny_sd1_dir), image_folder)
    lora_loss = _eval_loss(_pipeline(tiny_sd1_dir, finished.output), image_folder)
    assert lora_loss < 0.9 * base_loss, (base_loss, lora_loss)


def test_ema_and_dropout_runs_resume_exactly_and_export_the_average(tiny_sd1_dir, image_folder, tmp_path, monkeypatch):
    from safetensors import safe_open
    from safetensors.torch import load_file
    from tiny_runs import run_config

    from trainer.train import sampling

    seen = {}

    def spy(session, prompts):  # what the sample images would be rendered with
        seen["sampled"] = [p.detach().clone() for p in session.ema.params]
        seen["average"] = [s.clone() for s in session.ema.shadow]
        return []

    monkeypatch.setattr(sampling, "_render", spy)
    settings = dict(steps=6, seed=5, lr=3e-3, batch_size=2, ema_decay=0.6, ema_export_raw=True, sample_every=6,
                    save_every=3, **METHODS)
    straight = run_events(run_config(tiny_sd1_dir, image_folder, tmp_path / "a", **settings))[-1]
    assert all(torch.equal(a, b) for a, b in zip(seen["sampled"], seen["average"])), "samples show the EMA"
    assert [p.name for p in straight.extra_outputs if p.suffix == ".safetensors"] == ["lora.raw.safetensors"]

    interrupted = run_events(run_config(tiny_sd1_dir, image_folder, tmp_path / "b", **settings), stop_after=3)[-1]
    assert interrupted.step == 3 and interrupted.stopped_early
    resumed = run_events(run_config(tiny_sd1_dir, image_folder, tmp_path / "b", resume="auto", **settings))[-1]
    assert resumed.step == 6
    for name in ("lora.safetensors", "lora.raw.safetensors"):
        a, b = load_file(tmp_path / "a" / name), load_file(tmp_path / "b" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"{name} differs after resume"

    average, raw = load_file(straight.output), load_file(straight.extra_outputs[0])
    assert any(not torch.equal(average[k], raw[k]) for k in average if k.endswith("lora_up.weight"))
    with safe_open(str(straight.output), "pt") as f, safe_open(str(straight.extra_outputs[0]), "pt") as g:
        meta, raw_meta = f.metadata(), g.metadata()
    assert (meta["lorastudio_ema_decay"], raw_meta["lorastudio_ema_decay"]) == ("0.6", "None")
    assert (meta["ss_loss_type"], meta["ss_huber_schedule"], meta["ss_debiased_estimation"]) == ("huber", "snr", "True")
    assert (meta["lorastudio_timestep_sampling"], meta["ss_multires_noise_iterations"], meta["ss_ip_noise_gamma"]) == (
        "logit_normal", "3", "0.1")
    assert meta["ss_network_dropout"] == "0.1" and '"loraplus_lr_ratio": "4.0"' in meta["ss_network_args"]
