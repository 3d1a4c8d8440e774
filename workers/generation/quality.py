"""Quality floors on exits, from a profile's quality table.

For exit k with served perplexity ppl_k (with its adapter when it has one and the request allows it, without
otherwise) and top-1 agreement g_k with full depth, a request's floor holds when

    ppl_k / ppl_L <= max_perplexity_ratio   and   g_k >= min_top1_agreement.

Full depth always holds (ratio 1, agreement 1) and never uses an adapter; an exit absent from the table is
treated as failing the floor (its quality is unknown).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, Field

from workers.generation.profiler import ExitQuality


class ServedQuality(BaseModel):
    """Profile quality of one exit as served."""

    perplexity: float
    perplexity_ratio: float = Field(description="Perplexity over the full model's, on the held-out text")
    top1_agreement: float = Field(description="Fraction of next tokens equal to the full model's choice")
    exit_adapter: bool = Field(
        description="Whether these figures (and the answer) use the exit's adapter (and its pointer, if any)"
    )
    eval_text: str | None = Field(default=None, description="The evaluation text these figures are on")


def evaluation_text(profile: Mapping[str, Any] | None) -> str | None:
    """The name of the text a stored profile's quality table was measured on (profiles stored before texts
    had names were all on heldout.txt), None without a profile."""
    return (profile.get("eval_text") or "heldout") if profile else None


def quality_table(profile: Mapping[str, Any] | None) -> dict[int, ExitQuality]:
    """The quality table of a stored profile (JSON keys are strings), {} when there is none."""
    raw = (profile or {}).get("quality") or {}
    return {int(depth): ExitQuality.model_validate(entry) for depth, entry in raw.items()}


def _served(
    quality: Mapping[int, ExitQuality], depth: int, num_layers: int, exit_adapter: bool
) -> tuple[float, float, float, bool] | None:
    """(perplexity, ratio to full depth, agreement, adapter used) as served, None when unknown."""
    full, entry = quality.get(num_layers), quality.get(depth)
    if entry is None or full is None or not full.perplexity > 0:
        return None
    adapted = exit_adapter and depth < num_layers and entry.adapter_perplexity is not None
    perplexity, agreement = entry.served(adapted)
    return perplexity, perplexity / full.perplexity, agreement, adapted


def served_quality(
    quality: Mapping[int, ExitQuality], depth: int, num_layers: int, exit_adapter: bool = True
) -> ServedQuality | None:
    """The exit's profile quality as served (rounded for reports), None when the table lacks it."""
    served = _served(quality, depth, num_layers, exit_adapter)
    if served is None:
        return None
    perplexity, ratio, agreement, adapted = served
    return ServedQuality(
        perplexity=round(perplexity, 4),
        perplexity_ratio=round(ratio, 4),
        top1_agreement=round(agreement, 4),
        exit_adapter=adapted,
    )


def meets_floor(
    quality: Mapping[int, ExitQuality],
    num_layers: int,
    max_perplexity_ratio: float | None = None,
    min_top1_agreement: float | None = None,
    exit_adapter: bool = True,
) -> set[int]:
    """The depths in 1..num_layers whose served quality meets the floor (full depth always does)."""
    good = {num_layers}
    for depth in range(1, num_layers):
        served = _served(quality, depth, num_layers, exit_adapter)
        if served is None:
            continue
        _, ratio, agreement, _ = served
        if max_perplexity_ratio is not None and not ratio <= max_perplexity_ratio:
            continue
        if min_top1_agreement is not None and not agreement >= min_top1_agreement:
            continue
        good.add(depth)
    return good
