"""Choosing the exit depth of one request (the API side; the latency math is workers.generation.latency)."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import HTTPException

from service.generation.schemas import DepthOptions
from workers.generation.latency import InfeasibleBudget, LatencyProfile, choose_depth


@dataclass(frozen=True)
class DepthPlan:
    depth: int
    predicted_ms: float | None


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


def plan_depth(
    options: DepthOptions,
    num_layers: int,
    latency: LatencyProfile | None,
    prompt_tokens: int,
    new_tokens: int,
    queue_wait_ms: float,
) -> DepthPlan:
    """Explicit depth > budget (deepest predicted to fit) > full depth (the deepest allowed exit)."""
    exits = allowed_exits(options, num_layers)

    def predicted(depth: int) -> float | None:
        if latency is None:
            return None
        return round(queue_wait_ms + latency.predict(depth, prompt_tokens, new_tokens), 3)

    if options.depth is not None:
        if options.depth > num_layers:
            raise HTTPException(422, f"depth {options.depth} exceeds the model's {num_layers} layers")
        return DepthPlan(options.depth, predicted(options.depth))
    if options.latency_budget_ms is None or latency is None:
        return DepthPlan(exits[-1], predicted(exits[-1]))
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
        )
    except InfeasibleBudget as e:
        raise HTTPException(
            422,
            f"no allowed exit fits latency_budget_ms={options.latency_budget_ms:g}: the smallest achievable "
            f"is {e.min_latency_ms:.0f} ms (depth {e.depth}); raise the budget or use best_effort",
        ) from e
    return DepthPlan(depth, predicted(depth))
