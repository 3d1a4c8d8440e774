"""Choosing the exit depth of one request (the API side; the latency math is workers.generation.latency,
the quality floor workers.generation.quality)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from fastapi import HTTPException

from service.generation.schemas import DepthOptions
from workers.generation.latency import InfeasibleBudget, LatencyProfile, NoExitMeetsFloor, choose_depth
from workers.generation.profiler import ExitQuality
from workers.generation.quality import ServedQuality, meets_floor, served_quality


@dataclass(frozen=True)
class DepthPlan:
    depth: int
    predicted_ms: float | None
    quality: ServedQuality | None = None


def allowed_exits(options: DepthOptions, num_layers: int) -> list[int]:
    exits = sorted(set(options.exits)) if options.exits else list(range(1, num_layers + 1))
    if exits[-1] > num_layers:
        raise HTTPException(422, f"exits must lie in 1..{num_layers} for this model, got {exits[-1]}")
    if options.min_depth is not None:
        if options.min_depth > num_layers:
            raise HTTPException(422, f"min_depth {options.min_depth} exceeds the model's {num_layers} layers")
        exits = [k for k in exits if k >= options.min_depth]
        if not exits:
            raise HTTPException(422, f"no allowed exit is at or above min_depth {options.min_depth}")
    return exits


def has_floor(options: DepthOptions) -> bool:
    return options.max_perplexity_ratio is not None or options.min_top1_agreement is not None


def _floor_text(options: DepthOptions) -> str:
    parts = []
    if options.max_perplexity_ratio is not None:
        parts.append(f"max_perplexity_ratio={options.max_perplexity_ratio:g}")
    if options.min_top1_agreement is not None:
        parts.append(f"min_top1_agreement={options.min_top1_agreement:g}")
    return " and ".join(parts)


def plan_depth(
    options: DepthOptions,
    num_layers: int,
    latency: LatencyProfile | None,
    prompt_tokens: int,
    new_tokens: int,
    queue_wait_ms: float,
    quality: Mapping[int, ExitQuality] | None = None,
) -> DepthPlan:
    """Explicit depth > budget (deepest predicted to fit, among exits meeting the quality floor) > the deepest
    allowed exit meeting the floor. An exit without profiled quality never meets a floor, so a floor before
    the model is profiled leaves full depth."""
    exits = allowed_exits(options, num_layers)
    quality = quality or {}

    def plan(depth: int) -> DepthPlan:
        predicted = None
        if latency is not None:
            predicted = round(queue_wait_ms + latency.predict(depth, prompt_tokens, new_tokens), 3)
        return DepthPlan(depth, predicted, served_quality(quality, depth, num_layers, options.exit_adapter))

    if options.depth is not None:
        if options.depth > num_layers:
            raise HTTPException(422, f"depth {options.depth} exceeds the model's {num_layers} layers")
        return plan(options.depth)
    good = None
    if has_floor(options):
        good = meets_floor(
            quality,
            num_layers,
            options.max_perplexity_ratio,
            options.min_top1_agreement,
            options.exit_adapter,
        )
        exits_ok = [k for k in exits if k in good]
        if not exits_ok:
            raise HTTPException(422, f"no allowed exit meets {_floor_text(options)} per the model's profile")
    if options.latency_budget_ms is None or latency is None:
        candidates = [k for k in exits if good is None or k in good]
        return plan(candidates[-1])
    try:
        depth = choose_depth(
            latency,
            prompt_tokens,
            new_tokens,
            options.latency_budget_ms,
            queue_wait_ms=queue_wait_ms,
            allowed_exits=exits,
            min_depth=options.min_depth or 1,
            on_infeasible=options.on_infeasible,
            meets_floor=good,
        )
    except NoExitMeetsFloor as e:
        raise HTTPException(422, str(e)) from e
    except InfeasibleBudget as e:
        at = f" at {_floor_text(options)}" if good is not None else ""
        raise HTTPException(
            422,
            f"no allowed exit fits latency_budget_ms={options.latency_budget_ms:g}{at}: the smallest "
            f"achievable{at} is {e.min_latency_ms:.0f} ms (depth {e.depth}); raise the budget or use "
            "best_effort",
        ) from e
    return plan(depth)
