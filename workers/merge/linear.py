"""Linear merge (model soup, arXiv 2203.05482): theta = sum_i w_i * theta_i / sum_i w_i."""

from __future__ import annotations

import torch

from workers.merge.registry import TensorGroup, register
from workers.merge.sparsify import chunk_size, slices


@register("linear", needs_base=False, model_params={"weight": None}, global_params={"normalize": True})
def linear(group: TensorGroup) -> torch.Tensor:
    """Weighted sum of every listed model, accumulated in float32 (float64 inputs stay float64), one slice
    of the flattened tensors at a time so the accumulator stays in cache."""
    first = group.tensors[0]
    acc_dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    weights = [p["weight"] for p in group.model_params]
    total = torch.tensor(weights, dtype=acc_dtype).sum()
    out = torch.empty_like(first)
    flat = [t.reshape(-1) for t in group.tensors]
    size = chunk_size(first.device)
    acc = torch.empty(min(size, first.numel()), dtype=acc_dtype, device=first.device)
    for s in slices(first.numel(), size):
        a = acc[: s.stop - s.start].zero_()
        for tensor, weight in zip(flat, weights, strict=True):
            a.add_(tensor[s].to(acc_dtype), alpha=weight)
        if group.params["normalize"]:
            a.div_(total)
        out.view(-1)[s] = a
    return out
