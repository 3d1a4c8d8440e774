"""Combining task vectors: the shared core of task arithmetic, TIES and DARE (mergekit's
"generalized task arithmetic").

For deltas d_i = theta_i - theta_base, sparsified to d~_i = r_i * m_i * d_i (m_i = 1 everywhere without
trimming or dropping), the weighted deltas are d'_i = w_i * d~_i and

    D = sum_i c_i * d'_i,        theta = theta_base + lambda * D / Z

where c_i = 1 everywhere without consensus, and with TIES sign consensus c_i = [sign(d'_i) == s],
s = +1 where sum_i d'_i >= 0 else -1. With `normalize`, Z = sum_i c_i * w_i (0 -> 1) with consensus and
sum_i w_i (|.| < 1e-8 -> 1) without; otherwise Z = 1.

Once m_i and r_i are known everything is element-wise, so the output is computed one slice of the
flattened tensors at a time: the temporaries are a few slices, not a few copies of the tensor. Masks are
float 1.0 / 0.0 rather than booleans (torch's boolean kernels are several times slower on the CPU); the
sums run over i in order, as mergekit's `sum(dim=0)` does, so the result is the same to the last bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn.functional import hardshrink

from workers.merge.sparsify import TopK, chunk_size, slice_threads, slices, uniform_draws


@dataclass
class TaskVector:
    """Model i's sparsified delta d~_i = r * m * (theta_i - theta_base), produced slice by slice, in order.

    m keeps the top k entries of |d| when `top` is set (TIES trim), or where the flat 0/1 mask `keep` is 1
    (breadcrumbs); m ~ Bernoulli(density), the next draws of `generator`, when that is set (DARE drop), with
    a per-entry probability instead when the flat `probs` is set (DELLA); else m = 1. r = scale / divisor
    (mergekit's L1 rescale multiplies, DARE's 1 / density divides); with `divide_by_probs`, r = 1 / probs
    entry by entry.
    """

    tensor: torch.Tensor  # theta_i
    weight: float  # w_i
    top: TopK | None = None
    generator: torch.Generator | None = None
    density: float = 1.0
    scale: float = 1.0
    divisor: float = 1.0
    keep: torch.Tensor | None = None
    probs: torch.Tensor | None = None
    divide_by_probs: bool = False

    def __post_init__(self) -> None:
        if self.top is not None:
            # hardshrink(d, l) zeroes |d| <= l: l = tau keeps |d| > tau, l = the value below tau keeps >= tau
            tau = self.top.threshold.to(self.tensor.dtype)
            self._above = float(tau)
            self._at_least = float(torch.nextafter(tau, tau.new_tensor(float("-inf"))))

    def delta(self, s: slice, base: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """d~_i on slice `s` of the flattened tensors (`base` is theta_base already sliced)."""
        torch.sub(self.tensor.reshape(-1)[s], base, out=out)
        if self.top is not None and self.top.tied is not None:  # |d| > tau, and the listed ties
            bounds = torch.tensor([s.start, s.start + out.numel()], device=self.top.tied.device)
            lo, hi = torch.searchsorted(self.top.tied, bounds).tolist()
            where = (self.top.tied[lo:hi] - s.start).to(out.device)
            kept = out[where]
            hardshrink(out, self._above, out=out)
            out[where] = kept
        elif self.top is not None:  # |d| >= tau up to index `cut`, |d| > tau after it
            split = min(max(self.top.cut + 1 - s.start, 0), out.numel())
            if split > 0:
                hardshrink(out[:split], self._at_least, out=out[:split])
            if split < out.numel():
                hardshrink(out[split:], self._above, out=out[split:])
        if self.keep is not None:
            out.mul_(self.keep[s])
        if self.generator is not None and self.probs is not None:
            p = self.probs[s]
            draws = uniform_draws(self.generator, out.numel())
            out.mul_(torch.lt(draws, p.cpu(), out=draws).to(out.device, out.dtype))
            if self.divide_by_probs:
                out.div_(p)
        elif self.generator is not None:
            draws = uniform_draws(self.generator, out.numel())
            out.mul_(torch.lt(draws, self.density, out=draws).to(out.device, out.dtype))
        if self.scale != 1:
            out.mul_(self.scale)
        if self.divisor != 1:
            out.div_(self.divisor)
        return out


def elect_sign(weighted: torch.Tensor) -> torch.Tensor:
    """s = +1 where the summed weighted deltas are >= 0, else -1 (TIES "elect", sum method)."""
    total = weighted[0].clone()
    for d in weighted[1:]:
        total += d
    return torch.ge(total, 0, out=total).mul_(2).sub_(1)


def combine(
    base: torch.Tensor,
    vectors: list[TaskVector],
    *,
    consensus: bool,
    normalize: bool,
    lambda_: float,
) -> torch.Tensor:
    """theta_base + lambda * D / Z (see the module docstring), one slice at a time."""
    if not vectors:
        return base
    out = torch.empty_like(base)
    flat_base, flat_out = base.reshape(-1), out.view(-1)
    w = torch.tensor([v.weight for v in vectors], dtype=base.dtype, device=base.device).unsqueeze(1)
    total_weight = w.sum()
    if total_weight.abs() < 1e-8:
        total_weight.fill_(1)
    size = chunk_size(base.device)
    buffer = base.new_empty(len(vectors) + 3, min(size, base.numel()))
    with slice_threads(base.device):  # see slice_threads: slice-sized kernels, one thread
        for s in slices(base.numel(), size):
            b = flat_base[s]
            d, mixed, agree, divisor = (
                buffer[: len(vectors), : b.numel()],
                *buffer[len(vectors) :, : b.numel()],
            )
            for i, vector in enumerate(vectors):
                vector.delta(s, b, out=d[i])
            d.mul_(w)  # d'_i = w_i * d~_i
            if consensus:
                sign = elect_sign(d)
                mixed.zero_()
                divisor.zero_()
                for d_i, w_i in zip(d, w, strict=True):
                    torch.sign(d_i, out=agree).mul_(sign).clamp_(min=0)  # c_i = [sign(d'_i) == s]
                    mixed.addcmul_(d_i, agree)
                    if normalize:
                        divisor.addcmul_(w_i, agree)
                if normalize:
                    mixed.div_(divisor.add_(torch.eq(divisor, 0, out=agree)))  # Z = 0 -> 1
            else:
                mixed.copy_(d[0])
                for d_i in d[1:]:
                    mixed.add_(d_i)
                if normalize:
                    mixed.div_(total_weight)
            if lambda_ != 1:
                mixed.mul_(lambda_)
            torch.add(b, mixed, out=flat_out[s])
    return out
