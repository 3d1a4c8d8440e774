"""The quality floor: which exits meet max_perplexity_ratio / min_top1_agreement per the profile, and the
depth the API plans under a budget and a floor."""

from __future__ import annotations

import pytest
from fastapi import HTTPException

from service.generation.depth import plan_depth
from service.generation.schemas import DepthOptions
from workers.generation.latency import LatencyProfile, LinearInDepth
from workers.generation.profiler import ExitQuality
from workers.generation.quality import meets_floor, quality_table, served_quality

LAYERS = 8


def table() -> dict[int, ExitQuality]:
    """Plain exits are poor below full depth; adapters bring exit k to ratio 1 + (8 - k) / 2."""
    out = {}
    for k in range(2, LAYERS + 1):
        adapted = k < LAYERS
        out[k] = ExitQuality(
            depth=k,
            perplexity=10.0 * (1 + 100 * (LAYERS - k)),
            top1_agreement=1.0 if k == LAYERS else 0.1,
            tokens=100,
            adapter_perplexity=10.0 * (1 + (LAYERS - k) / 2) if adapted else None,
            adapter_top1_agreement=1 - (LAYERS - k) / 10 if adapted else None,
        )
    return out


def latency() -> LatencyProfile:
    linear = LinearInDepth(
        a0_ms=0,
        a1_ms_per_layer=10,
        b0_ms_per_prompt_token=0,
        b1_ms_per_prompt_token_layer=0,
        c0_ms_per_new_token=0,
        c1_ms_per_new_token_layer=0,
    )
    return LatencyProfile(num_layers=LAYERS, depths={LAYERS: linear.at(LAYERS)}, linear=linear)


def test_floor_uses_the_adapted_quality_unless_the_request_turns_adapters_off():
    quality = table()
    assert meets_floor(quality, LAYERS, max_perplexity_ratio=2.0) == {6, 7, 8}
    assert meets_floor(quality, LAYERS, max_perplexity_ratio=2.0, exit_adapter=False) == {8}
    assert meets_floor(quality, LAYERS, min_top1_agreement=0.75) == {6, 7, 8}
    assert meets_floor(quality, LAYERS, max_perplexity_ratio=3.0, min_top1_agreement=0.85) == {7, 8}
    assert 1 not in meets_floor(quality, LAYERS, max_perplexity_ratio=1e9)  # exit 1 was never profiled


def test_served_quality_reports_ratio_to_full_depth_and_whether_the_adapter_is_on():
    served = served_quality(table(), 6, LAYERS)
    assert served.perplexity_ratio == pytest.approx(2.0) and served.exit_adapter is True
    plain = served_quality(table(), 6, LAYERS, exit_adapter=False)
    assert plain.perplexity_ratio == pytest.approx(201.0) and plain.exit_adapter is False
    assert served_quality(table(), LAYERS, LAYERS).exit_adapter is False


def test_quality_table_reads_a_stored_profile():
    stored = {"quality": {str(k): q.model_dump(mode="json") for k, q in table().items()}}
    assert quality_table(stored) == table() and quality_table(None) == {}


@pytest.mark.parametrize("budget", [5.0, 25.0, 45.0, 65.0, 75.0, 1000.0])
@pytest.mark.parametrize("ratio", [1.0, 1.5, 2.0, 3.0, 10.0])
def test_planned_exit_never_breaks_the_floor(budget, ratio):
    options = DepthOptions(latency_budget_ms=budget, max_perplexity_ratio=ratio)
    plan = plan_depth(options, LAYERS, latency(), 4, 4, 0.0, table())
    good = meets_floor(table(), LAYERS, max_perplexity_ratio=ratio)
    assert plan.depth in good
    assert plan.quality is not None and plan.quality.perplexity_ratio <= ratio
    fitting = [k for k in good if 10 * k <= budget]
    assert plan.depth == (max(fitting) if fitting else min(good))


def test_reject_names_the_smallest_latency_at_that_quality():
    options = DepthOptions(latency_budget_ms=5, max_perplexity_ratio=2.0, on_infeasible="reject")
    with pytest.raises(HTTPException) as caught:
        plan_depth(options, LAYERS, latency(), 4, 4, 0.0, table())
    assert caught.value.status_code == 422
    assert "max_perplexity_ratio=2" in caught.value.detail and "60 ms (depth 6)" in caught.value.detail


def test_a_floor_before_any_profile_leaves_full_depth():
    options = DepthOptions(latency_budget_ms=5, max_perplexity_ratio=2.0)
    assert plan_depth(options, LAYERS, latency(), 4, 4, 0.0, {}).depth == LAYERS


def test_no_allowed_exit_meeting_the_floor_is_a_422():
    options = DepthOptions(latency_budget_ms=50, max_perplexity_ratio=2.0, exits=[2, 3])
    with pytest.raises(HTTPException) as caught:
        plan_depth(options, LAYERS, latency(), 4, 4, 0.0, table())
    assert caught.value.status_code == 422 and "meets max_perplexity_ratio=2" in caught.value.detail
