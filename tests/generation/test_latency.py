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
    PrefillSample,
    choose_depth,
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
