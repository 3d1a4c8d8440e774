"""Sparsification of task vectors (deltas): keep a `density` fraction of each tensor's entries.

The whole-tensor statistics (the magnitude threshold, L1 norms) are computed slice by slice over
|theta_i - theta_base|, so no full-size delta is ever materialised.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from workers.threads import held_threads

CHUNK = 1 << 16  # entries per slice on the CPU: a slice of every model stays in the L2 cache
GPU_CHUNK = 1 << 24  # on an accelerator, fewer and larger kernel launches (a multiple of CHUNK)

DIRECT_SELECT = 1 << 17  # up to this many values, a plain kthvalue is as fast as bracketing

Entries = Callable[[slice | torch.Tensor], torch.Tensor]  # index (slice or positions) -> 1-D values


def chunk_size(device: torch.device) -> int:
    return CHUNK if device.type == "cpu" else GPU_CHUNK


@contextmanager
def slice_threads(device: torch.device) -> Iterator[None]:
    """One intra-op thread on the CPU while slice-sized kernels run, then the process's count again.

    A CHUNK slice sits in the L2 cache, so splitting one kernel on it across threads gains little, and
    each split is a barrier: when other processes share the cores, a barrier waits for a descheduled
    thread, a scheduler time slice (about 20 ms per kernel measured here at load 9 on 2 cores, against
    under 1 ms on one thread). Whole-tensor kernels (sorts, selections) keep every thread."""
    with held_threads(1 if device.type == "cpu" else None):
        yield


def slices(n: int, size: int = CHUNK) -> Iterator[slice]:
    """[0, n) as consecutive slices of `size` entries."""
    return (slice(start, min(start + size, n)) for start in range(0, n, size))


def delta_magnitude(tensor: torch.Tensor, base: torch.Tensor) -> Entries:
    """index -> |theta_i - theta_base| (float32) at that index, computed on demand."""
    t, b = tensor.reshape(-1), base.reshape(-1)

    def at(index: slice | torch.Tensor) -> torch.Tensor:
        if isinstance(index, torch.Tensor):
            index = index.to(t.device)
        return (t[index] - b[index]).abs_().float()

    return at


@dataclass(frozen=True)
class TopK:
    """The k largest of n values: every value > `threshold`, and the first k - #(> threshold) values
    equal to it, in index order (the last of them at index `cut`). Exactly k entries, as a stable
    descending sort's first k would be; `dropped` entries equal to `threshold` are left out. When `tied`
    is set, it lists instead (sorted) the positions of the entries equal to `threshold` that are kept."""

    threshold: torch.Tensor
    cut: int
    dropped: int = 0
    tied: torch.Tensor | None = None


def magnitude_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the k = max(1, int(density * numel)) entries of largest |delta| (TIES "trim"); among entries
    tied with the k-th largest, the first in flat order."""
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    magnitude = delta.reshape(-1).abs().float()
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta, dtype=torch.bool)
    top = top_k(magnitude, max(1, int(density * delta.numel())))
    index = torch.arange(delta.numel(), device=delta.device)
    keep = (magnitude > top.threshold) | ((magnitude == top.threshold) & (index <= top.cut))
    return keep.reshape(delta.shape)


def mergekit_tie_choice(values: torch.Tensor | Entries, k: int, top: TopK, n: int | None = None) -> TopK:
    """`top` with mergekit 0.1.5's choice among the entries equal to the threshold.

    mergekit keeps the first k of torch.argsort(|d|, descending=True), an unstable sort: which of the
    entries tied with the k-th largest it keeps depends on the whole tensor. `introsort.settle_first_k`
    follows the CPU sort (as mergekit runs it) to that choice without sorting; it runs only when some
    tied entries must be dropped.
    """
    if top.dropped == 0:
        return top  # every tied entry is kept: nothing to choose
    from workers.merge.introsort import settle_first_k  # imports numba: only this tie-break needs it

    at = values.__getitem__ if isinstance(values, torch.Tensor) else values
    n = values.numel() if n is None else n
    flat = at(slice(0, n)).cpu().float()
    if isinstance(values, torch.Tensor):
        flat = flat.clone()  # reordered in place below: not the caller's tensor
    first = settle_first_k(flat.numpy(), k)
    kept = np.sort(first[flat[:k].numpy() == top.threshold.cpu().numpy()])
    return TopK(top.threshold, top.cut, top.dropped, torch.from_numpy(kept).long().to(top.threshold.device))


def kth_largest(values: torch.Tensor | Entries, k: int, n: int | None = None) -> torch.Tensor:
    """The exact k-th largest of n values (see `top_k`)."""
    return top_k(values, k, n).threshold


def top_k(values: torch.Tensor | Entries, k: int, n: int | None = None) -> TopK:
    """The k largest of n values: a 1-D tensor, or a function index -> values (read in slices).

    A random sample (one entry from each of `size` equal strata, so it is read in order) brackets the
    k-th largest between two sample quantiles, a margin of several standard deviations of the sample
    rank apart; one pass counts the entries above the bracket and keeps the few inside it (with their
    positions), and the exact selection runs on those. Falls back to the whole tensor if the bracket
    missed, so the answer is always exact.
    """
    at = values.__getitem__ if isinstance(values, torch.Tensor) else values
    n = values.numel() if n is None else n
    if n <= DIRECT_SELECT:
        return _select(at(slice(0, n)), torch.arange(n), k)
    size = min(1 << 16, max(1 << 12, n >> 7))
    stride = n // size
    generator = torch.Generator().manual_seed(0)
    picks = torch.arange(size) * stride + torch.randint(stride, (size,), generator=generator)
    sample = at(picks)
    rank = k / n * size  # the k-th largest's expected rank in the sample, from the top
    margin = 6 * (size * (k / n) * (1 - k / n)) ** 0.5 + 32
    top, bottom = int(rank - margin), int(rank + margin)
    inf = sample.new_tensor(float("inf"))
    hi = _smallest(sample, size - 1 - top) if top >= 0 else inf  # past the ends, the bracket is open
    lo = _smallest(sample, size - 1 - bottom) if bottom < size else -inf
    chunk = chunk_size(sample.device)
    above, band, where = 0, [], []
    for s in slices(n, chunk):
        count, inside, position = _split(at(s), lo, hi)
        above += count
        band.append(inside)
        where.append(position + s.start)
    above, band, where = int(above), torch.cat(band), torch.cat(where)
    if above < k <= above + band.numel():
        return _select(band, where, k - above)
    return _select(torch.cat([at(s) for s in slices(n, chunk)]), torch.arange(n), k)


def _select(values: torch.Tensor, positions: torch.Tensor, k: int) -> TopK:
    """Exact top k of a 1-D tensor whose entries sit at the (increasing) `positions`."""
    threshold = _smallest(values, values.numel() - k)
    above = int((values > threshold).sum())
    tied = positions[(values == threshold).to(positions.device)]
    return TopK(threshold, int(tied[k - above - 1]), dropped=tied.numel() - (k - above))


def _numpy_ok(v: torch.Tensor) -> bool:
    return v.device.type == "cpu" and v.dtype in (torch.float16, torch.float32, torch.float64)


def _smallest(v: torch.Tensor, j: int) -> torch.Tensor:
    """The j-th smallest entry (from 0) of a 1-D tensor; NumPy's introselect is twice torch's speed."""
    if _numpy_ok(v):
        return torch.from_numpy(np.partition(v.numpy(), j)[j : j + 1]).reshape(())
    return v.kthvalue(j + 1).values


def _split(v: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> tuple[int | torch.Tensor, ...]:
    """(number of entries > hi, the entries in [lo, hi], their indices); on the CPU in NumPy, whose
    boolean selection is several times faster than torch's."""
    if _numpy_ok(v):
        x = v.numpy()
        inside = np.flatnonzero((x >= lo.numpy()) & (x <= hi.numpy()))
        return int(np.count_nonzero(x > hi.numpy())), torch.from_numpy(x[inside]), torch.from_numpy(inside)
    inside = ((v >= lo) & (v <= hi)).nonzero().squeeze(1)
    return (v > hi).sum(), v[inside], inside.cpu()


def l1_rescale_factor(
    magnitude: Entries, n: int, k: int, top: TopK, size: int = CHUNK, eps: float = 1e-7
) -> float:
    """||d||_1 / ||d~||_1 for d~ = the top k entries of d (mergekit's rescale); 1 when either is below eps."""
    before = after = above = 0
    for s in slices(n, size):
        v = magnitude(s)
        over = v[v > top.threshold]
        before += v.sum(dtype=torch.float64)
        after += over.sum(dtype=torch.float64)
        above += over.numel()
    before, after = float(before), float(after) + (k - above) * float(top.threshold)
    return 1.0 if before < eps or after < eps else before / after


def uniform_draws(generator: torch.Generator, n: int) -> torch.Tensor:
    """The next n uniform [0, 1) draws of a CPU `generator`, drawn CHUNK at a time, so a mask drawn for a
    whole tensor and one drawn slice by slice (in order, slices of a multiple of CHUNK) are the same."""
    if n <= CHUNK:
        return torch.rand(n, generator=generator)
    return torch.cat([torch.rand(s.stop - s.start, generator=generator) for s in slices(n)])


def bernoulli_mask(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """Keep each entry independently with probability `density` (DARE "drop", drop rate p = 1 - density).

    Drawn on the CPU from `generator`, so a seed gives the same mask on every device.
    """
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    draw = uniform_draws(generator, delta.numel()).reshape(delta.shape)
    return (draw < density).to(delta.device)


def dare(delta: torch.Tensor, density: float, generator: torch.Generator, rescale: bool) -> torch.Tensor:
    """DARE (arXiv 2311.03099): d~ = m * d / (1 - p), m ~ Bernoulli(1 - p), with p = 1 - density.

    The rescale is the paper's exact 1 / (1 - p) = 1 / density, so E[d~] = d entry by entry.
    """
    kept = delta * bernoulli_mask(delta, density, generator)
    return kept / density if rescale and density < 1 else kept
