"""Sparsification of task vectors (deltas): keep a `density` fraction of each tensor's entries."""

from __future__ import annotations

import torch


def magnitude_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the k = max(1, int(density * numel)) entries of largest |delta| (TIES "trim").

    Selects the k-th largest magnitude with `kthvalue` (linear time) instead of sorting the tensor.
    Entries tied with the threshold are all kept; with real-valued deltas such ties only occur at zero,
    where keeping them changes nothing.
    """
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta, dtype=torch.bool)
    k = max(1, int(density * delta.numel()))
    magnitude = delta.abs().reshape(-1).float()
    return (magnitude >= kth_largest(magnitude, k)).reshape(delta.shape)


def kth_largest(values: torch.Tensor, k: int, sample_size: int = 1 << 16) -> torch.Tensor:
    """The exact k-th largest entry of a 1-D tensor.

    A random sample brackets the answer between two sample quantiles (a margin of several standard
    deviations of the sample rank); one pass counts the entries above the bracket, and the exact
    selection then runs on the few entries inside it. Falls back to a full `kthvalue` if the bracket
    missed, so the answer is always exact.
    """
    n = values.numel()
    if n <= 8 * sample_size:
        return values.kthvalue(n - k + 1).values
    generator = torch.Generator(device=values.device).manual_seed(0)
    picks = torch.randint(n, (sample_size,), generator=generator, device=values.device)
    sample = values[picks].sort(descending=True).values
    rank = k / n * sample_size
    margin = 6 * (sample_size * (k / n) * (1 - k / n)) ** 0.5 + 32
    hi = sample[max(int(rank - margin), 0)]
    lo = sample[min(int(rank + margin), sample_size - 1)]
    above = int((values > hi).sum())
    band = values[(values <= hi) & (values >= lo)]
    if above < k <= above + band.numel():
        return band.kthvalue(band.numel() - (k - above) + 1).values
    return values.kthvalue(n - k + 1).values


def bernoulli_mask(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """Keep each entry independently with probability `density` (DARE "drop", drop rate p = 1 - density).

    Drawn on the CPU from `generator`, so a seed gives the same mask on every device.
    """
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    draw = torch.rand(delta.shape, generator=generator, device="cpu")
    return (draw < density).to(delta.device)


def dare(delta: torch.Tensor, density: float, generator: torch.Generator, rescale: bool) -> torch.Tensor:
    """DARE (arXiv 2311.03099): d~ = m * d / (1 - p), m ~ Bernoulli(1 - p), with p = 1 - density.

    The rescale is the paper's exact 1 / (1 - p) = 1 / density, so E[d~] = d entry by entry.
    """
    kept = delta * bernoulli_mask(delta, density, generator)
    return kept / density if rescale and density < 1 else kept


def l1_rescale(delta: torch.Tensor, kept: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """kept * ||delta||_1 / ||kept||_1 (mergekit's rescale); unchanged when either norm is below eps."""
    before, after = delta.abs().sum(), kept.abs().sum()
    if before < eps or after < eps:
        return kept
    return kept * (before / after)
