"""The latency model: fitting, interpolation, bounded online correction, and depth choice under a budget."""

from __future__ import annotations

import math

import numpy as np
import pytest

from workers.generation.latency import (
    DecodeSample,
    DepthCoefficients,
    InfeasibleBudget,
    LatencyProfile,
    NoExitMeetsFloor,
    PrefillSample,
    choose_depth,
    default_latency,
    fit_latency,
)

DEPTHS = (2, 4, 6, 8)


def true_coefficients(depth: int) -> tuple[float, float, float]:
    return 3.0 + 0.5 * depth, 0.02 * depth, 1.0 + 0.4 * depth


def synthetic_samples(noise: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    prefill, decode = [], []
    for depth in DEPTHS:
        a, b, c = true_coefficients(depth)
        for prompt in (8, 32, 128, 512):
            for _ in range(5):
                ms = (a + b * prompt) * (1 + noise * rng.standard_normal())
                prefill.append(PrefillSample(depth=depth, prompt_tokens=prompt, ms=ms))
        for new in (4, 16, 64):
            for _ in range(5):
                ms = c * new * (1 + noise * rng.standard_normal())
                decode.append(DecodeSample(depth=depth, new_tokens=new, ms=ms))
    return prefill, decode


def linear_profile(scale: float = 1.0) -> LatencyProfile:
    """t(k, P, N) = k * (1 + 0.01 P + N) ms for k in 1..8, profiled at even depths."""
    coefficients = {
        k: DepthCoefficients(a_ms=k, b_ms_per_prompt_token=0.01 * k, c_ms_per_new_token=k) for k in DEPTHS
    }
    return LatencyProfile(num_layers=8, depths=coefficients, scale=scale)


def test_fit_recovers_known_coefficients_exactly_without_noise():
    profile = fit_latency(8, *synthetic_samples(noise=0.0))
    assert sorted(profile.depths) == list(DEPTHS)
    for depth in DEPTHS:
        got = profile.depths[depth]
        expected = true_coefficients(depth)
        fitted = (got.a_ms, got.b_ms_per_prompt_token, got.c_ms_per_new_token)
        assert fitted == pytest.approx(expected, rel=1e-9)


def test_fit_is_close_under_noise():
    profile = fit_latency(8, *synthetic_samples(noise=0.03))
    for depth in DEPTHS:
        a, b, c = true_coefficients(depth)
        assert profile.predict(depth, 256, 32) == pytest.approx(a + 256 * b + 32 * c, rel=0.05)


def test_fit_needs_both_kinds_of_samples():
    prefill, _ = synthetic_samples(noise=0.0)
    with pytest.raises(ValueError):
        fit_latency(8, prefill, [])


def test_predict_interpolates_and_extrapolates_linearly_in_depth():
    profile = linear_profile()
    assert profile.predict(4, 100, 10) == pytest.approx(4 * (1 + 1 + 10))
    assert profile.predict(5, 100, 10) == pytest.approx(5 * 12)
    assert profile.predict(1, 100, 10) == pytest.approx(12)
    with pytest.raises(ValueError):
        profile.predict(9, 1, 1)


def test_profile_round_trips_through_json():
    profile = linear_profile(scale=1.3)
    assert LatencyProfile.model_validate_json(profile.model_dump_json()) == profile


def test_one_outlier_moves_the_scale_by_a_bounded_factor():
    profile = linear_profile()
    predicted = profile.predict(4, 100, 10)
    spiked = profile.observe(4, 100, 10, observed_ms=1000 * predicted)
    assert 1.0 < spiked.scale <= 2.0**0.2 + 1e-12
    dropped = profile.observe(4, 100, 10, observed_ms=predicted / 1000)
    assert 2.0**-0.2 - 1e-12 <= dropped.scale < 1.0
    assert profile.scale == 1.0


def test_online_scale_tracks_a_persistent_slowdown():
    profile = linear_profile()
    for _ in range(60):
        profile = profile.observe(6, 50, 20, observed_ms=1.5 * linear_profile().predict(6, 50, 20))
    assert profile.scale == pytest.approx(1.5, rel=1e-3)
    unchanged = profile.observe(6, 50, 20, observed_ms=math.nan)
    assert unchanged.scale == profile.scale


def test_choose_depth_picks_the_deepest_that_fits():
    profile = linear_profile()
    per_layer = 1 + 0.01 * 100 + 10
    assert choose_depth(profile, 100, 10, budget_ms=5 * per_layer + 0.1) == 5
    assert choose_depth(profile, 100, 10, budget_ms=5 * per_layer + 0.1, queue_wait_ms=per_layer) == 4
    assert choose_depth(profile, 100, 10, budget_ms=5 * per_layer + 0.1, allowed_exits=[2, 4, 6, 8]) == 4
    assert choose_depth(profile, 100, 10, budget_ms=None) == 8
    assert choose_depth(profile, 100, 10, budget_ms=None, allowed_exits=[2, 6]) == 6


def test_choose_depth_when_nothing_fits():
    profile = linear_profile()
    assert choose_depth(profile, 100, 10, budget_ms=1.0, allowed_exits=[4, 6], min_depth=3) == 4
    with pytest.raises(InfeasibleBudget) as caught:
        choose_depth(
            profile, 100, 10, budget_ms=1.0, queue_wait_ms=7.0, allowed_exits=[4, 6], on_infeasible="reject"
        )
    assert caught.value.depth == 4
    assert caught.value.min_latency_ms == pytest.approx(7.0 + 4 * 12)
    with pytest.raises(ValueError):
        choose_depth(profile, 100, 10, budget_ms=None, allowed_exits=[2], min_depth=3)


def busy_machine_samples(seed: int = 0):
    """Per-depth samples like a profile taken on a busy machine: true cost 40 + 10 k ms prefill (+0.1 k per
    prompt token), 2 k ms per new token, but each depth's runs slowed by a random factor up to 2x, and a few
    runs 10x slower."""
    rng = np.random.default_rng(seed)
    prefill, decode = [], []
    for depth in range(2, 31, 2):
        slow = 1 + rng.uniform(0, 1.0)
        for prompt in (16, 96):
            for _ in range(2):
                spike = 10.0 if rng.uniform() < 0.08 else 1.0
                ms = (40 + 10 * depth + 0.1 * depth * prompt) * slow * spike
                prefill.append(PrefillSample(depth=depth, prompt_tokens=prompt, ms=ms))
            decode.append(DecodeSample(depth=depth, new_tokens=8, ms=8 * 2 * depth * slow))
    return prefill, decode


@pytest.mark.parametrize("seed", range(5))
def test_fitted_latency_is_non_decreasing_in_depth_whatever_the_noise(seed):
    profile = fit_latency(30, *busy_machine_samples(seed))
    for prompt, new in ((1, 1), (16, 8), (500, 200)):
        predictions = [profile.predict(k, prompt, new) for k in range(1, 31)]
        assert all(a <= b for a, b in zip(predictions, predictions[1:], strict=False))
    assert profile.linear is not None
    assert min(profile.linear.model_dump().values()) >= 0


def test_a_few_slow_samples_do_not_bend_the_fit():
    prefill, decode = synthetic_samples(noise=0.0)
    clean = fit_latency(8, prefill, decode)
    spiked = [
        PrefillSample(depth=s.depth, prompt_tokens=s.prompt_tokens, ms=s.ms * 10) if i % 13 == 0 else s
        for i, s in enumerate(prefill)
    ]
    robust = fit_latency(8, spiked, decode)
    for depth in (1, 4, 8):
        assert robust.predict(depth, 128, 16) == pytest.approx(clean.predict(depth, 128, 16), rel=0.02)


def test_default_latency_model_is_slower_per_layer_and_monotone():
    profile = default_latency(num_layers=30, num_parameters=135_000_000, gflops=5.0)
    predictions = [profile.predict(k, 32, 16) for k in range(1, 31)]
    assert all(a < b for a, b in zip(predictions, predictions[1:], strict=False))
    # 2 x 135e6 / 31 flops per layer-token at 5 GFLOP/s: about 1.74 ms per layer-token
    assert profile.predict(30, 32, 16) == pytest.approx(50 + 48 * 31 * 2 * 135e6 / 31 / 5e9 * 1e3)


def test_choose_depth_never_returns_an_exit_outside_the_quality_floor():
    profile = linear_profile()
    rng = np.random.default_rng(0)
    for _ in range(200):
        good = {int(k) for k in rng.choice(np.arange(1, 9), size=rng.integers(1, 9), replace=False)}
        budget = float(rng.uniform(1, 200))
        mode = "best_effort" if rng.uniform() < 0.5 else "reject"
        try:
            depth = choose_depth(profile, 10, 10, budget, on_infeasible=mode, meets_floor=good)
        except InfeasibleBudget as e:
            assert mode == "reject" and e.floor and e.depth == min(good)
            assert e.min_latency_ms == pytest.approx(profile.predict(min(good), 10, 10))
            continue
        assert depth in good
        fitting = [k for k in good if profile.predict(k, 10, 10) <= budget]
        assert depth == (max(fitting) if fitting else min(good))


def test_no_exit_meeting_the_floor_is_an_error():
    with pytest.raises(NoExitMeetsFloor):
        choose_depth(linear_profile(), 10, 10, 100.0, allowed_exits=[1, 2], meets_floor={8})
