"""A per-depth latency model and the choice of exit depth under a latency budget.

For exit depth k, P prompt tokens and N new tokens the predicted latency in milliseconds is

    t(k, P, N) = s * (a_k + b_k * P + c_k * N),

where a_k + b_k * P is the prefill (which also yields the first token), c_k the cost of one decode step
(N is charged as N steps, one more than needed: a slightly conservative estimate), and s one global
correction factor learnt online from served requests (load on the machine slows every depth alike).

Profiles fitted here are linear in depth by construction, with every coefficient >= 0:

    a_k = a0 + a1 k,   b_k = b0 + b1 k,   c_k = c0 + c1 k      (a fixed cost plus a per-layer cost),

fitted jointly over all profiled depths by iteratively reweighted non-negative least squares on relative
errors with Huber weights, so t is non-decreasing in k whatever the noise, and a few slow samples (a busy
machine) cannot bend it. Older profiles stored per-depth coefficients only; for those, depths between
profiled depths are interpolated linearly in k and extrapolated from the two nearest beyond them.
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


class LinearInDepth(BaseModel):
    """a_k = a0 + a1 k, b_k = b0 + b1 k, c_k = c0 + c1 k, all >= 0: non-decreasing in depth."""

    model_config = ConfigDict(frozen=True)

    a0_ms: float = Field(ge=0)
    a1_ms_per_layer: float = Field(ge=0)
    b0_ms_per_prompt_token: float = Field(ge=0)
    b1_ms_per_prompt_token_layer: float = Field(ge=0)
    c0_ms_per_new_token: float = Field(ge=0)
    c1_ms_per_new_token_layer: float = Field(ge=0)

    def at(self, depth: int) -> DepthCoefficients:
        return DepthCoefficients(
            a_ms=self.a0_ms + self.a1_ms_per_layer * depth,
            b_ms_per_prompt_token=self.b0_ms_per_prompt_token + self.b1_ms_per_prompt_token_layer * depth,
            c_ms_per_new_token=self.c0_ms_per_new_token + self.c1_ms_per_new_token_layer * depth,
        )


class LatencyProfile(BaseModel):
    """Coefficients of t(k, P, N) for a model with `num_layers` layers, plus the online scale s: from the
    joint linear-in-depth model when it has one (`linear`), else per profiled depth (`depths`)."""

    model_config = ConfigDict(frozen=True)

    num_layers: int = Field(ge=1)
    depths: dict[int, DepthCoefficients]
    scale: float = Field(default=1.0, gt=0)
    linear: LinearInDepth | None = None

    def coefficients_at(self, depth: int) -> DepthCoefficients:
        """Coefficients at `depth`: from the linear-in-depth model, else profiled, else linear in k through
        the two nearest profiled depths."""
        if self.linear is not None:
            return self.linear.at(depth)
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


def default_latency(
    num_layers: int, num_parameters: int, gflops: float, overhead_ms: float = 50.0
) -> LatencyProfile:
    """A conservative latency model for a model not profiled yet: every token, prompt or new, costs
    2 x parameters floating-point operations at `gflops` (no batching gain for the prompt), the parameters
    split evenly between the L layers and one share for the embeddings and head, plus a fixed overhead."""
    share_ms = 2.0 * num_parameters / (num_layers + 1) / (gflops * 1e9) * 1000.0
    linear = LinearInDepth(
        a0_ms=overhead_ms,
        a1_ms_per_layer=0.0,
        b0_ms_per_prompt_token=share_ms,
        b1_ms_per_prompt_token_layer=share_ms,
        c0_ms_per_new_token=share_ms,
        c1_ms_per_new_token_layer=share_ms,
    )
    return LatencyProfile(num_layers=num_layers, depths={num_layers: linear.at(num_layers)}, linear=linear)


def _robust_nnls(design: np.ndarray, target: np.ndarray, iterations: int = 20) -> np.ndarray:
    """argmin_x>=0 sum_i w_i ((design x - target)_i / target_i)^2, Huber weights w_i recomputed from the
    relative residuals (threshold 1.345 x their MAD-based scale) for a few rounds."""
    from scipy.optimize import nnls

    relative = 1.0 / np.maximum(np.abs(target), 1e-6)
    weights = np.ones_like(target)
    solution = np.zeros(design.shape[1])
    for _ in range(iterations):
        root = np.sqrt(weights) * relative
        solution, _ = nnls(design * root[:, None], target * root, maxiter=50 * design.shape[1])
        residual = (design @ solution - target) * relative
        spread = 1.4826 * float(np.median(np.abs(residual - np.median(residual))))
        threshold = 1.345 * max(spread, 1e-3)
        new_weights = np.minimum(1.0, threshold / np.maximum(np.abs(residual), 1e-12))
        if np.allclose(new_weights, weights, atol=1e-6):
            break
        weights = new_weights
    return solution


def fit_linear_in_depth(prefill: Sequence[PrefillSample], decode: Sequence[DecodeSample]) -> LinearInDepth:
    """Fit (a0, a1, b0, b1) on prefill samples, ms ~ a0 + a1 k + (b0 + b1 k) P, and (c0, c1) on decode
    samples, ms ~ N (c0 + c1 k), jointly over all depths, non-negative and robust to outliers."""
    k = np.array([s.depth for s in prefill], dtype=float)
    p = np.array([s.prompt_tokens for s in prefill], dtype=float)
    ms = np.array([s.ms for s in prefill], dtype=float)
    a0, a1, b0, b1 = _robust_nnls(np.stack([np.ones_like(k), k, p, k * p], axis=1), ms)
    kd = np.array([s.depth for s in decode], dtype=float)
    n = np.array([s.new_tokens for s in decode], dtype=float)
    msd = np.array([s.ms for s in decode], dtype=float)
    c0, c1 = _robust_nnls(np.stack([n, n * kd], axis=1), msd)
    return LinearInDepth(
        a0_ms=float(a0),
        a1_ms_per_layer=float(a1),
        b0_ms_per_prompt_token=float(b0),
        b1_ms_per_prompt_token_layer=float(b1),
        c0_ms_per_new_token=float(c0),
        c1_ms_per_new_token_layer=float(c1),
    )


def fit_latency(
    num_layers: int, prefill: Iterable[PrefillSample], decode: Iterable[DecodeSample]
) -> LatencyProfile:
    """The joint linear-in-depth model from prefill and decode samples (at least one depth with both);
    `depths` lists its coefficients at the profiled depths."""
    prefill = [s for s in prefill if math.isfinite(s.ms)]
    decode = [s for s in decode if math.isfinite(s.ms)]
    profiled = sorted({s.depth for s in prefill} & {s.depth for s in decode})
    if not profiled:
        raise ValueError("need prefill and decode samples at one depth at least")
    linear = fit_linear_in_depth(prefill, decode)
    return LatencyProfile(num_layers=num_layers, depths={k: linear.at(k) for k in profiled}, linear=linear)


class InfeasibleBudget(Exception):
    """No allowed depth meets the budget (at the required quality when there is a floor); `min_latency_ms`
    is the best achievable at `depth`, queue wait included."""

    def __init__(self, budget_ms: float, min_latency_ms: float, depth: int, floor: bool = False) -> None:
        quality = " at the required quality" if floor else ""
        super().__init__(
            f"latency budget {budget_ms:.1f} ms cannot be met{quality}; the fastest allowed depth {depth} "
            f"needs about {min_latency_ms:.1f} ms"
        )
        self.budget_ms = budget_ms
        self.min_latency_ms = min_latency_ms
        self.depth = depth
        self.floor = floor


class NoExitMeetsFloor(ValueError):
    """No allowed exit meets the requested quality floor."""


def choose_depth(
    profile: LatencyProfile,
    prompt_tokens: int,
    max_new_tokens: int,
    budget_ms: float | None,
    queue_wait_ms: float = 0.0,
    allowed_exits: Iterable[int] | None = None,
    min_depth: int = 1,
    on_infeasible: Literal["best_effort", "reject"] = "best_effort",
    meets_floor: Iterable[int] | None = None,
) -> int:
    """The deepest allowed k >= min_depth with queue_wait + t(k, P, N) <= budget that is in `meets_floor`
    (the depths meeting a quality floor; None: no floor).

    Without a budget: the deepest allowed depth meeting the floor (full depth by default). When no depth
    fits: "best_effort" returns the shallowest allowed depth meeting the floor, "reject" raises
    InfeasibleBudget with the smallest latency at that quality. No allowed depth meeting the floor raises
    NoExitMeetsFloor.
    """
    exits = range(1, profile.num_layers + 1) if allowed_exits is None else allowed_exits
    candidates = sorted({k for k in exits if min_depth <= k <= profile.num_layers})
    if not candidates:
        raise ValueError(f"no allowed exit is between min_depth {min_depth} and {profile.num_layers}")
    if meets_floor is not None:
        good = set(meets_floor)
        candidates = [k for k in candidates if k in good]
        if not candidates:
            raise NoExitMeetsFloor("no allowed exit meets the requested quality floor")
    if budget_ms is None:
        return candidates[-1]
    totals = {k: queue_wait_ms + profile.predict(k, prompt_tokens, max_new_tokens) for k in candidates}
    fitting = [k for k in candidates if totals[k] <= budget_ms]
    if fitting:
        return fitting[-1]
    if on_infeasible == "best_effort":
        return candidates[0]
    fastest = min(candidates, key=totals.__getitem__)
    raise InfeasibleBudget(budget_ms, totals[fastest], fastest, floor=meets_floor is not None)
