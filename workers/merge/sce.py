"""SCE (arXiv 2408.07990): select the entries where the models disagree most, calculate weights from the
task vectors' energy, erase minority signs, merge. No `weight` per model: the weights come from the data.

For task vectors d_i = theta_i - theta_base (i = 1..N, the base excluded even when listed):

1. select: with select_topk = s < 1, v = Var_i(d_i) (population variance, entry by entry); keep the
   k = int(s * #(v != 0)) entries of largest v (k = 0 keeps none), d_i <- M * d_i; s >= 1 keeps all
2. calculate: e_i = mean(d_i^2); w_i = e_i / sum_j e_j, or 1 / N when |sum_j e_j| < 1e-6
3. erase: c_i = [sign(d_i) == s], s = +1 where sum_i d_i >= 0 else -1 (unweighted TIES election)
4. merge: theta = theta_base + sum_i c_i w_i d_i / max(sum_i c_i w_i, 1e-6)

The variance and the energies use the same torch reductions as mergekit 0.1.5; the top k is an exact k-th
value search, and where tied entries straddle the k-th value, torch.topk picks among them as in mergekit,
so the selection, ties included, is mergekit's.
"""

from __future__ import annotations

import torch

from workers.merge.registry import TensorGroup, register
from workers.merge.sparsify import top_k


def select_mask(deltas: torch.Tensor, select_topk: float) -> torch.Tensor | None:
    """M over one tensor's entries (None: keep all): the top k of the variance across models."""
    if select_topk >= 1:
        return None
    if select_topk <= 0:
        return torch.zeros_like(deltas[0])
    variance = torch.var(deltas, dim=0, unbiased=False)
    k = int(torch.count_nonzero(variance) * select_topk)  # a float32 product, as in mergekit
    if k == 0:
        return torch.zeros_like(variance)
    spread = variance.abs().view(-1)
    top = top_k(spread, k)
    if top.dropped == 0:  # no tie straddles the k-th value: the k largest are exactly those >= it
        return (variance.abs() >= top.threshold).to(variance.dtype)
    mask = torch.zeros_like(variance)  # which tied entries to keep: torch.topk's choice, as in mergekit
    mask.view(-1)[torch.topk(spread, k=k, largest=True).indices] = 1
    return mask


def energy_weights(deltas: torch.Tensor) -> torch.Tensor:
    """w_i = mean(d_i^2) / sum_j mean(d_j^2), uniform when that sum is below 1e-6."""
    energy = deltas.square().reshape(deltas.shape[0], -1).mean(dim=1)
    total = energy.sum().item()
    if abs(total) < 1e-6:
        return torch.full_like(energy, 1 / energy.numel())
    return energy / total


@register(
    "sce",
    needs_base=True,
    model_params={},
    global_params={"int8_mask": False, "select_topk": 1.0},
    bounds={"select_topk": (0.0, 1.0)},
)
def sce(group: TensorGroup) -> torch.Tensor:
    base = group.base
    if not group.tensors:
        return base
    deltas = torch.stack([t - base for t in group.tensors])
    mask = select_mask(deltas, group.params["select_topk"])
    if mask is not None:
        deltas.mul_(mask)
    total = deltas.sum(dim=0)
    majority = torch.ge(total, 0, out=total).mul_(2).sub_(1)  # s = +1 where sum_i d_i >= 0, else -1
    weights = energy_weights(deltas).reshape(-1, *([1] * base.dim()))
    erased = (torch.sign(deltas) == majority).to(base.dtype).mul_(weights)  # c_i * w_i
    merged = (deltas * erased).sum(dim=0)
    return base + merged / erased.sum(dim=0).clamp(min=1e-6)
