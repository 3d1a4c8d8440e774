"""A per-depth latency model and the choice of exit depth under a latency budget.

For exit depth k, P prompt tokens and N new tokens the predicted latency in milliseconds is

    t(k, P, N) = s * (a_k + b_k * P + c_k * N),

where a_k + b_k * P is the prefill (which also yields the first token), c_k the cost of one decode step
(N is charged as N steps, one more than needed: a slightly conservative estimate), and s one global
correction factor learnt online from served requests (load on the machine slows every depth alike).
Depths between profiled depths are interpolated linearly in k (per-layer cost is uniform), and
extrapolated from the two nearest beyond them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field


class DepthCoefficients(BaseModel):
    """t = a_ms + b_ms_per_prompt_token * P + c_ms_per_new_token * N at one depth."""

    model_config = ConfigDict(frozen=True)

    a_ms: float = Field(ge=0)
    b_ms_per_prompt_token: float = Field(ge=0)
    c_ms_per_new_token: float = Field(ge=0)

    def time_ms(self, prompt_tokens: int, new_tokens: int) -> float:
        return self.a_ms + self.b_ms_per_prompt_token * prompt_tokens + self.c_ms_per_new_token * new_tokens


class PrefillSample(BaseModel):
    """Measured prefill (prompt of P tokens, producing the first token) at one depth."""

    depth: int = Field(ge=1)
    prompt_tokens: int = Field(ge=1)
    ms: float = Field(ge=0)


class DecodeSample(BaseModel):
    """Measured time of `new_tokens` decode steps after the prefill, at one depth."""

    depth: int = Field(ge=1)
    new_tokens: int = Field(ge=1)
    ms: float = Field(ge=0)


class LatencyProfile(BaseModel):
    """Per-depth coefficients of t(k, P, N) for a model with `num_layers` layers, plus the online scale s."""

    model_config = ConfigDict(frozen=True)

    num_layers: int = Field(ge=1)
    depths: dict[int, DepthCoefficients]
    scale: float = Field(default=1.0, gt=0)

    def coefficients_at(self, depth: int) -> DepthCoefficients:
        """Coefficients at `depth`: profiled, or linear in k through the two nearest profiled depths."""
        if depth in self.depths:
            return self.depths[depth]
        grid = sorted(self.depths)
        if len(grid) == 1:
            return self.depths[grid[0]]
        upper = min((k for k in grid if k > depth), default=grid[-1])
        upper = max(upper, grid[1])
        lower = grid[grid.index(upper) - 1]
        weight = (depth - lower) / (upper - lower)
        low, high = self.depths[lower], self.depths[upper]
        return DepthCoefficients(
            **{
                name: max(0.0, (1 - weight) * getattr(low, name) + weight * getattr(high, name))
                for name in DepthCoefficients.model_fields
            }
        )

    def predict(self, depth: int, prompt_tokens: int, new_tokens: int) -> float:
        """t(k, P, N) in milliseconds, including the online scale."""
        if not 1 <= depth <= self.num_layers:
            raise ValueError(f"depth must be between 1 and {self.num_layers}, got {depth}")
        return self.scale * self.coefficients_at(depth).time_ms(prompt_tokens, new_tokens)

    def observe(
        self,
        depth: int,
        prompt_tokens: int,
        new_tokens: int,
        observed_ms: float,
        rate: float = 0.2,
        max_ratio: float = 2.0,
        scale_bounds: tuple[float, float] = (0.1, 10.0),
    ) -> LatencyProfile:
        """A copy with s updated from one served request, robust to outliers.

        r = clip(observed / predicted, 1/max_ratio, max_ratio);  log s' = log s + rate * log r,
        so one observation moves s by at most a factor max_ratio**rate (1.149 by default), and s stays
        within `scale_bounds`.
        """
        predicted = self.predict(depth, prompt_tokens, new_tokens)
        if predicted <= 0 or observed_ms <= 0 or not math.isfinite(observed_ms):
            return self
        ratio = min(max(observed_ms / predicted, 1 / max_ratio), max_ratio)
        scale = self.scale * math.exp(rate * math.log(ratio))
        return self.model_copy(update={"scale": min(max(scale, scale_bounds[0]), scale_bounds[1])})


def fit_prefill(samples: Sequence[PrefillSample]) -> tuple[float, float]:
    """Least squares (a, b) = argmin sum (a + b P_i - ms_i)^2, kept >= 0; b = 0 with one prompt length."""
    prompt = np.array([s.prompt_tokens for s in samples], dtype=float)
    ms = np.array([s.ms for s in samples], dtype=float)
    if len(set(prompt.tolist())) < 2:
        return max(float(ms.mean()), 0.0), 0.0
    design = np.stack([np.ones_like(prompt), prompt], axis=1)
    (a, b), *_ = np.linalg.lstsq(design, ms, rcond=None)
    if b < 0:
        return max(float(ms.mean()), 0.0), 0.0
    if a < 0:
        return 0.0, float(np.dot(prompt, ms) / np.dot(prompt, prompt))
    return float(a), float(b)


def fit_decode(samples: Sequence[DecodeSample]) -> float:
    """Least squares through the origin c = sum(N_i * ms_i) / sum(N_i^2)."""
    new = np.array([s.new_tokens for s in samples], dtype=float)
    ms = np.array([s.ms for s in samples], dtype=float)
    return max(float(np.dot(new, ms) / np.dot(new, new)), 0.0)


def fit_latency(
    num_layers: int, prefill: Iterable[PrefillSample], decode: Iterable[DecodeSample]
) -> LatencyProfile:
    """Fit a_k, b_k from prefill samples and c_k from decode samples, for every depth that has both."""
    prefill_by: dict[int, list[PrefillSample]] = {}
    decode_by: dict[int, list[DecodeSample]] = {}
    for sample in prefill:
        prefill_by.setdefault(sample.depth, []).append(sample)
    for sample in decode:
        decode_by.setdefault(sample.depth, []).append(sample)
    depths = {}
    for depth in sorted(set(prefill_by) & set(decode_by)):
        a, b = fit_prefill(prefill_by[depth])
        depths[depth] = DepthCoefficients(
            a_ms=a, b_ms_per_prompt_token=b, c_ms_per_new_token=fit_decode(decode_by[depth])
        )
    if not depths:
        raise ValueError("need prefill and decode samples at one depth at least")
    return LatencyProfile(num_layers=num_layers, depths=depths)


class InfeasibleBudget(Exception):
    """No allowed depth meets the budget; `min_latency_ms` is the best achievable, queue wait included."""

    def __init__(self, budget_ms: float, min_latency_ms: float, depth: int) -> None:
        super().__init__(
            f"latency budget {budget_ms:.1f} ms cannot be met; the fastest allowed depth {depth} "
            f"needs about {min_latency_ms:.1f} ms"
        )
        self.budget_ms = budget_ms
        self.min_latency_ms = min_latency_ms
        self.depth = depth


def choose_depth(
    profile: LatencyProfile,
    prompt_tokens: int,
    max_new_tokens: int,
    budget_ms: float | None,
    queue_wait_ms: float = 0.0,
    allowed_exits: Iterable[int] | None = None,
    min_depth: int = 1,
    on_infeasible: Literal["best_effort", "reject"] = "best_effort",
) -> int:
    """The deepest allowed k >= min_depth with queue_wait + t(k, P, N) <= budget.

    Without a budget: the deepest allowed depth (full depth by default). When no depth fits:
    "best_effort" returns the shallowest allowed depth, "reject" raises InfeasibleBudget.
    """
    exits = range(1, profile.num_layers + 1) if allowed_exits is None else allowed_exits
    candidates = sorted({k for k in exits if min_depth <= k <= profile.num_layers})
    if not candidates:
        raise ValueError(f"no allowed exit is between min_depth {min_depth} and {profile.num_layers}")
    if budget_ms is None:
        return candidates[-1]
    totals = {k: queue_wait_ms + profile.predict(k, prompt_tokens, max_new_tokens) for k in candidates}
    fitting = [k for k in candidates if totals[k] <= budget_ms]
    if fitting:
        return fitting[-1]
    if on_infeasible == "best_effort":
        return candidates[0]
    fastest = min(candidates, key=totals.__getitem__)
    raise InfeasibleBudget(budget_ms, totals[fastest], fastest)
