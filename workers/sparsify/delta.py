"""Sparsify a fine-tune's delta against its base, tensor by tensor, and describe the delta.

With d = W_tuned - W_base for each tensor:

  DARE (arXiv 2311.03099):  W = W_base + m * d / (1 - p),  m ~ Bernoulli(1 - p) per entry, p = 1 - density
  magnitude:                W = W_base + [ |d| >= k-th largest |d| ] * d,  k = density * numel

DARE's masks come from a generator seeded by (seed, tensor name), so a result does not depend on the
order tensors are visited in. DARE works when deltas are small (the paper: |d| within about 0.005);
`large_deltas` flags a delta whose 99th percentile |d| exceeds that, where DARE's rescale tends to break
the model and magnitude sparsification (or none) is the safer choice.

The masks are workers.merge.sparsify's, so a standalone sparsify and a dare_* merge agree entry by entry.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch

from workers.merge.sparsify import bernoulli_mask, magnitude_mask

Method = Literal["dare", "magnitude"]
Progress = Callable[[int, int, str], None]
DARE_SAFE_DELTA = 0.005
SAMPLE_PER_TENSOR = 1 << 16


@dataclass
class TensorStats:
    name: str
    numel: int
    kept: int
    abs_mean: float
    abs_max: float


@dataclass
class DeltaStats:
    """Statistics of |d| over every sparsified entry; median and p99 are estimated from a weighted sample."""

    kept_fraction: float
    abs_mean: float
    abs_median: float
    abs_p99: float
    abs_max: float
    large_deltas: bool
    tensors: list[TensorStats] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


@dataclass
class SparsifyResult:
    tensors: dict[str, torch.Tensor]
    stats: DeltaStats


def tensor_seed(seed: int, name: str) -> int:
    """A stable per-tensor seed, independent of visiting order and device."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def sparsify_delta(
    delta: torch.Tensor, method: Method, density: float, generator: torch.Generator
) -> tuple[torch.Tensor, int]:
    """(sparsified delta, number of entries kept) by DARE or by magnitude, see the module docstring."""
    if not 0 < density <= 1:
        raise ValueError(f"density must lie in (0, 1], got {density}")
    if method == "dare":
        mask = bernoulli_mask(delta, density, generator)
        return delta * mask / density, int(mask.sum())
    if method == "magnitude":
        mask = magnitude_mask(delta, density)
        return delta * mask, int(mask.sum())
    raise ValueError(f"unknown method {method!r}")


def weighted_quantile(values: torch.Tensor, weights: torch.Tensor, q: float) -> float:
    """The q-quantile of a weighted sample (each value standing for `weight` entries)."""
    order = values.argsort()
    cumulative = weights[order].cumsum(0)
    index = torch.searchsorted(cumulative, q * cumulative[-1]).clamp(max=values.numel() - 1)
    return values[order][index].item()


def sparsify(
    base: Mapping[str, torch.Tensor],
    tuned: Mapping[str, torch.Tensor],
    method: Method = "dare",
    density: float = 0.1,
    seed: int = 0,
    progress: Progress | None = None,
) -> SparsifyResult:
    """W_base + sparsified (W_tuned - W_base) for every floating tensor the two share with equal shape.

    Tensors missing from the base, of another shape, or not floating point are passed through from
    `tuned` unchanged and listed in stats.skipped. Mappings may load lazily: each tensor is read once.
    """
    out: dict[str, torch.Tensor] = {}
    per_tensor: list[TensorStats] = []
    skipped: list[str] = []
    samples: list[torch.Tensor] = []
    weights: list[torch.Tensor] = []
    names = list(tuned.keys())
    for done, name in enumerate(names):
        tuned_t = tuned[name]
        base_t = base[name] if name in base else None
        if base_t is None or base_t.shape != tuned_t.shape or not tuned_t.is_floating_point():
            out[name] = tuned_t
            skipped.append(name)
            continue
        delta = tuned_t.float() - base_t.float()
        generator = torch.Generator().manual_seed(tensor_seed(seed, name))
        sparse, kept = sparsify_delta(delta, method, density, generator)
        out[name] = (base_t.float() + sparse).to(tuned_t.dtype)
        magnitude = delta.abs().reshape(-1)
        per_tensor.append(
            TensorStats(name, delta.numel(), kept, magnitude.mean().item(), magnitude.max().item())
        )
        pick = torch.randint(
            magnitude.numel(), (min(magnitude.numel(), SAMPLE_PER_TENSOR),), generator=generator
        )
        samples.append(magnitude[pick.to(magnitude.device)].cpu())
        weights.append(torch.full((pick.numel(),), magnitude.numel() / pick.numel(), dtype=torch.float64))
        if progress is not None:
            progress(done + 1, len(names), name)
    return SparsifyResult(out, _summarize(per_tensor, samples, weights, skipped))


def _summarize(
    per_tensor: list[TensorStats],
    samples: list[torch.Tensor],
    weights: list[torch.Tensor],
    skipped: list[str],
) -> DeltaStats:
    if not per_tensor:
        raise ValueError("base and tuned share no floating tensor of equal shape")
    total = sum(t.numel for t in per_tensor)
    values, w = torch.cat(samples), torch.cat(weights)
    p99 = weighted_quantile(values, w, 0.99)
    return DeltaStats(
        kept_fraction=sum(t.kept for t in per_tensor) / total,
        abs_mean=sum(t.abs_mean * t.numel for t in per_tensor) / total,
        abs_median=weighted_quantile(values, w, 0.5),
        abs_p99=p99,
        abs_max=max(t.abs_max for t in per_tensor),
        large_deltas=p99 > DARE_SAFE_DELTA,
        tensors=per_tensor,
        skipped=skipped,
    )
