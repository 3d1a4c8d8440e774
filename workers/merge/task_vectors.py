"""Combining task vectors: the shared core of task arithmetic, TIES and DARE (mergekit's
"generalized task arithmetic").

For deltas d_i = theta_i - theta_base with weights w_i, the weighted deltas are d'_i = w_i * d_i and

    D = sum_i m_i * d'_i,        theta = theta_base + lambda * D / Z

where m_i = 1 everywhere without consensus, and with TIES sign consensus m_i = [sign(d'_i) == s],
s = +1 where sum_i d'_i >= 0 else -1. With `normalize`, Z = sum_i m_i * w_i (0 -> 1); otherwise Z = 1.
"""

from __future__ import annotations

import torch


def elect_sign(weighted: torch.Tensor) -> torch.Tensor:
    """s = +1 where the summed weighted deltas are >= 0, else -1 (TIES "elect", sum method)."""
    return torch.where(weighted.sum(dim=0) >= 0, 1, -1).to(weighted.dtype)


def combine(
    base: torch.Tensor,
    deltas: list[torch.Tensor],
    weights: list[float],
    *,
    consensus: bool,
    normalize: bool,
    lambda_: float,
) -> torch.Tensor:
    if not deltas:
        return base
    weighted = torch.stack([w * d for w, d in zip(weights, deltas, strict=True)])
    w = torch.tensor(weights, dtype=base.dtype, device=base.device).reshape(-1, *([1] * base.dim()))
    if consensus:
        mask = (weighted.sign() == elect_sign(weighted)).to(base.dtype)
        mixed = (weighted * mask).sum(dim=0)
        divisor = (w * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = weighted.sum(dim=0)
        divisor = w.sum(dim=0).expand_as(mixed).clone()
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed = mixed / divisor
    if lambda_ != 1:
        mixed = mixed * lambda_
    return (base + mixed).to(base.dtype)
