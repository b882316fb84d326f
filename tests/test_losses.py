"""The loss variants, their weightings, the noise and the timestep samplers, pinned on small tensors.

Expected numbers are worked out by hand from the formulas (kohya sd-scripts' definitions, see
/trainer/train/losses.py and loss_weighting.py) and written down as literals: a change of formula
changes a number here.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from trainer.config.schema import TrainConfig
from trainer.train.loss_weighting import (
    debiased_weight,
    min_snr_weight,
    timestep_weights,
    v_pred_like_loss_weight,
    v_pred_like_noise_pred_scale,
)
from trainer.train.losses import diffusion_loss, elementwise_loss, huber_threshold
from trainer.train.noise import (
    logit_normal_timesteps,
    noisy_latents,
    pyramid_noise,
    sample_noise,
    sample_timesteps,
    timestep_bounds,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# alpha_bar 0.8, 0.5, 0.2 -> SNR = ab/(1-ab) = 4, 1, 0.25 and sigma = sqrt((1-ab)/ab) = 0.5, 1, 2
ALPHA_BAR = torch.tensor([0.8, 0.5, 0.2])
SNR = torch.tensor([4.0, 1.0, 0.25])
CPU = torch.device("cpu")


def _scheduler(prediction_type: str = "epsilon", alphas_cumprod: torch.Tensor = ALPHA_BAR, steps: int = 3):
    return SimpleNamespace(alphas_cumprod=alphas_cumprod,
                           config=SimpleNamespace(prediction_type=prediction_type, num_train_timesteps=steps))


# errors d = prediction - target of 0, 0.5 and 3
ERRORS = torch.tensor([0.0, 0.5, 3.0])


@pytest.mark.parametrize(("loss_type", "c", "expected"), [
    ("l2", None, [0.0, 0.25, 9.0]),                                 # d²
    ("l1", None, [0.0, 0.5, 3.0]),                                  # |d|
    ("huber", 0.1, [0.0, 0.0819803903, 0.5803332408]),              # 2c(sqrt(d²+c²)-c): 0.2(sqrt(.26)-.1), 0.2(sqrt(9.01)-.1)
    ("smooth_l1", 0.1, [0.0, 0.8198039027, 5.8033324079]),          # 2(sqrt(d²+c²)-c)
    ("huber", 1.0, [0.0, 0.2360679775, 4.3245553203]),              # 2(sqrt(1.25)-1), 2(sqrt(10)-1)
])
def test_each_loss_type_gives_the_hand_computed_values(loss_type: str, c: float | None, expected: list[float]):
    threshold = None if c is None else torch.full((3,), c)
    got = elementwise_loss(ERRORS.view(3, 1), torch.zeros(3, 1), loss_type, threshold)
    torch.testing.assert_close(got.view(3), torch.tensor(expected), rtol=1e-6, atol=1e-7)


def test_huber_is_near_l2_for_small_errors_and_linear_for_large_ones():
    c = torch.tensor([0.1])
    small, large = torch.tensor([[1e-3]]), torch.tensor([[100.0]])
    assert elementwise_loss(small, torch.zeros(1, 1), "huber", c).item() == pytest.approx(1e-6, rel=1e-2)  # float32 cancellation
    assert elementwise_loss(large, torch.zeros(1, 1), "huber", c).item() == pytest.approx(2 * 0.1 * (100 - 0.1), rel=1e-4)


@pytest.mark.parametrize(("schedule", "huber_c", "huber_scale", "timesteps", "steps", "expected"), [
    ("constant", 0.1, 2.0, [0, 1, 2], 3, [0.2, 0.2, 0.2]),                        # c·scale
    ("exponential", 0.1, 1.0, [0, 500, 1000], 1000, [1.0, 0.3162277660, 0.1]),    # exp(ln(c)·t/T)·scale
    ("exponential", 0.1, 2.0, [0, 500, 1000], 1000, [2.0, 0.6324555320, 0.2]),
    ("snr", 0.1, 5.0, [0, 1, 2], 3, [0.5, 0.325, 0.2]),                           # 0.9/(1+sigma)²+0.1, no scale
])
def test_huber_threshold_schedules(schedule, huber_c, huber_scale, timesteps, steps, expected):
    got = huber_threshold(schedule, huber_c, huber_scale, torch.tensor(timesteps), ALPHA_BAR, steps)
    torch.testing.assert_close(got, torch.tensor(expected), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(("name", "weights", "expected"), [
    ("min-SNR γ=1, epsilon", min_snr_weight(SNR, 1.0, False), [0.25, 1.0, 1.0]),       # min(SNR,γ)/SNR
    ("min-SNR γ=1, v-pred", min_snr_weight(SNR, 1.0, True), [0.2, 0.5, 0.2]),          # min(SNR,γ)/(SNR+1)
    ("v-pred scaled like noise-pred", v_pred_like_noise_pred_scale(SNR), [0.8, 0.5, 0.2]),  # SNR/(SNR+1)
    ("v-pred-like loss 0.5", v_pred_like_loss_weight(SNR, 0.5), [1.625, 2.0, 3.5]),     # 1 + 0.5(SNR+1)/SNR
    ("debiased, epsilon", debiased_weight(SNR, False), [0.5, 1.0, 2.0]),               # 1/sqrt(SNR)
    ("debiased, v-pred", debiased_weight(SNR, True), [0.2, 0.5, 0.8]),                 # 1/(SNR+1)
    ("SNR capped at 1000", debiased_weight(torch.tensor([9999.0]), False), [1 / math.sqrt(1000)]),
    ("cap, v-pred scale", v_pred_like_noise_pred_scale(torch.tensor([9999.0])), [1000 / 1001]),
])
def test_each_weighting_gives_the_hand_computed_values(name: str, weights: torch.Tensor, expected: list[float]):
    torch.testing.assert_close(weights, torch.tensor(expected), rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize(("options", "v_prediction", "expected"), [
    ({}, False, None),
    ({"min_snr_gamma": 1.0, "debiased_estimation": True}, False, [0.125, 1.0, 2.0]),     # [.25,1,1]·[.5,1,2]
    ({"min_snr_gamma": 1.0, "scale_v_pred_loss_like_noise_pred": True}, True, [0.16, 0.25, 0.04]),  # [.2,.5,.2]·[.8,.5,.2]
    ({"v_pred_like_loss": 0.5, "debiased_estimation": True}, False, [0.8125, 2.0, 7.0]),  # [1.625,2,3.5]·[.5,1,2]
])
def test_weightings_multiply_in_kohyas_order(options: dict, v_prediction: bool, expected: list[float] | None):
    weights = timestep_weights(SNR, v_prediction, TrainConfig(**{"min_snr_gamma": 0.0, **options}))
    if expected is None:
        assert weights is None
    else:
        torch.testing.assert_close(weights, torch.tensor(expected), rtol=1e-6, atol=1e-7)


# One value per sample: errors 1, 2, 0.5 at timesteps 0, 1, 2 (SNR 4, 1, 0.25)
PREDICTION = torch.tensor([1.0, 2.0, 0.5]).view(3, 1, 1, 1).expand(3, 2, 2, 2)


@pytest.mark.parametrize(("options", "expected"), [
    ({"loss": "l2"}, (1 + 4 + 0.25) / 3),
    ({"loss": "l2", "debiased_estimation": True}, (1 * 0.5 + 4 * 1 + 0.25 * 2) / 3),
    ({"loss": "l2", "min_snr_gamma": 1.0}, (1 * 0.25 + 4 + 0.25) / 3),
    ({"loss": "l1", "min_snr_gamma": 1.0}, (1 * 0.25 + 2 + 0.5) / 3),
    # c(t) = 0.5, 0.325, 0.2: 2c(sqrt(d²+c²)-c) = 0.6180340, 1.1058022, 0.1354066
    ({"loss": "huber", "huber_schedule": "snr", "huber_c": 0.1}, 0.6197476019),
    ({"loss": "smooth_l1", "huber_schedule": "constant", "huber_c": 1.0}, (2 * (math.sqrt(2) - 1) + 2 * (math.sqrt(5) - 1)
                                                                         + 2 * (math.sqrt(1.25) - 1)) / 3),
])
def test_diffusion_loss_reduces_per_sample_then_weights_then_averages(options: dict, expected: float):
    train = TrainConfig(**{"min_snr_gamma": 0.0, **options})
    loss = diffusion_loss(PREDICTION, torch.zeros(3, 2, 2, 2), _scheduler(), torch.tensor([0, 1, 2]), train)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


# --- noise -------------------------------------------------------------------------------------


def test_default_noise_and_timesteps_draw_the_same_stream_as_before():
    """Runs without the new options keep their exact noise: randn, then randint, nothing else."""
    latents, train = torch.zeros(2, 4, 8, 8), TrainConfig()
    g, reference = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    noise = sample_noise(latents, train, g)
    timesteps = sample_timesteps(2, 1000, train, g, CPU)
    assert torch.equal(noise, torch.randn(latents.shape, generator=reference))
    assert torch.equal(timesteps, torch.randint(0, 1000, (2,), generator=reference))
    assert torch.equal(g.get_state(), reference.get_state())


def test_one_multires_level_is_a_second_full_resolution_draw_then_unit_std():
    base = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    g, replay = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    got = pyramid_noise(base, iterations=1, discount=0.3, generator=g)
    torch.rand((), generator=replay)  # the level's size factor (unused at level 0: factor**0 = 1)
    by_hand = base + torch.randn(2, 4, 16, 16, generator=replay)
    torch.testing.assert_close(got, by_hand / by_hand.std())


def _neighbour_correlation(noise: torch.Tensor) -> float:
    left, right = noise[..., :-1].flatten(), noise[..., 1:].flatten()
    return torch.corrcoef(torch.stack([left, right]))[0, 1].item()


def test_multires_noise_keeps_shape_and_unit_std_and_adds_low_frequencies():
    latents = torch.zeros(4, 4, 64, 64)

    def noise(**options):
        return sample_noise(latents, TrainConfig(**options), torch.Generator().manual_seed(5))

    plain, weak, strong = noise(), noise(multires_noise_iterations=6), noise(multires_noise_iterations=6,
                                                                            multires_noise_discount=0.8)
    for n in (weak, strong):
        assert n.shape == latents.shape and n.std().item() == pytest.approx(1.0, rel=1e-5)
        assert abs(n.mean().item()) < 0.1
    # neighbouring values: independent in plain noise, correlated by the upsampled levels
    assert abs(_neighbour_correlation(plain)) < 0.01 < _neighbour_correlation(weak) < 0.25 < _neighbour_correlation(strong)
    tiny = sample_noise(torch.zeros(1, 4, 4, 4), TrainConfig(multires_noise_iterations=10), torch.Generator())
    assert tiny.shape == (1, 4, 4, 4)  # levels stop at 1 pixel instead of failing


def test_noise_offset_moves_whole_channels():
    latents = torch.zeros(8, 4, 32, 32)
    offset = sample_noise(latents, TrainConfig(noise_offset=0.5), torch.Generator().manual_seed(2))
    plain = sample_noise(latents, TrainConfig(), torch.Generator().manual_seed(2))
    channel_means = (offset - plain).mean(dim=(2, 3))
    assert torch.allclose(offset - plain, channel_means[..., None, None].expand_as(offset), atol=1e-6)
    assert channel_means.std().item() == pytest.approx(0.5, rel=0.35)


def test_input_perturbation_noises_the_input_but_not_the_target():
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=1000)
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([100, 700])
    g, replay = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    got = noisy_latents(scheduler, latents, noise, t, 0.1, g)
    ab = scheduler.alphas_cumprod[t].view(2, 1, 1, 1)
    by_hand = ab.sqrt() * latents + (1 - ab).sqrt() * (noise + 0.1 * torch.randn(2, 4, 8, 8, generator=replay))
    torch.testing.assert_close(got, by_hand)
    untouched = torch.Generator().manual_seed(4)
    torch.testing.assert_close(noisy_latents(scheduler, latents, noise, t, 0.0, untouched),
                               scheduler.add_noise(latents, noise, t))
    assert torch.equal(untouched.get_state(), torch.Generator().manual_seed(4).get_state())  # gamma 0 draws nothing


# --- timesteps ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("options", "steps", "bounds"), [
    ({}, 1000, (0, 1000)),
    ({"timestep_sampling": "range", "min_timestep": 200, "max_timestep": 300}, 1000, (200, 300)),
    ({"timestep_sampling": "logit_normal", "max_timestep": 1000}, 500, (0, 500)),  # clipped to the schedule
])
def test_timestep_bounds(options: dict, steps: int, bounds: tuple[int, int]):
    assert timestep_bounds(TrainConfig(**options), steps) == bounds


def test_range_sampling_stays_in_its_bounds_and_covers_them_evenly():
    train = TrainConfig(timestep_sampling="range", min_timestep=200, max_timestep=300)
    t = sample_timesteps(20000, 1000, train, torch.Generator().manual_seed(0), CPU)
    assert t.dtype == torch.int64 and t.min().item() == 200 and t.max().item() == 299
    counts = torch.bincount(t - 200, minlength=100).float()
    assert counts.min() > 0.6 * counts.mean() and counts.max() < 1.4 * counts.mean()


@pytest.mark.parametrize(("options", "median"), [
    ({}, 500.0),                                                         # sigmoid(0) = 0.5 of [0, 1000)
    ({"logit_mean": -1.0}, 1000 / (1 + math.e)),                         # sigmoid(-1)·1000 = 268.9
    ({"min_timestep": 100, "max_timestep": 300}, 200.0),                  # the middle of the range
])
def test_logit_normal_sampling_has_its_median_and_favours_the_middle(options: dict, median: float):
    train = TrainConfig(timestep_sampling="logit_normal", **options)
    t = sample_timesteps(20000, 1000, train, torch.Generator().manual_seed(1), CPU)
    low, high = timestep_bounds(train, 1000)
    assert low <= t.min().item() and t.max().item() < high
    assert t.float().median().item() == pytest.approx(median, abs=0.02 * (high - low))
    if not options:  # P(|z| < ln 2) = 0.512 of the draws fall in the middle third, against 1/3 for uniform
        middle = ((t >= 1000 / 3) & (t < 2000 / 3)).float().mean().item()
        assert middle == pytest.approx(0.512, abs=0.02)


def test_logit_normal_timesteps_never_reach_the_upper_bound():
    t = logit_normal_timesteps(1000, 0, 10, 0.0, 50.0, torch.Generator().manual_seed(0))  # sigmoid saturates to 0 and 1
    assert t.min().item() == 0 and t.max().item() == 9
