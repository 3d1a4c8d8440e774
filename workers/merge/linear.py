"""Linear merge (model soup, arXiv 2203.05482): theta = sum_i w_i * theta_i / sum_i w_i."""

from __future__ import annotations

import torch

from workers.merge.registry import TensorGroup, register


@register("linear", needs_base=False, model_params={"weight": None}, global_params={"normalize": True})
def linear(group: TensorGroup) -> torch.Tensor:
    """Weighted sum of every listed model, accumulated in float32 (float64 inputs stay float64)."""
    first = group.tensors[0]
    acc_dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    weights = [p["weight"] for p in group.model_params]
    out = torch.zeros_like(first, dtype=acc_dtype)
    for tensor, weight in zip(group.tensors, weights, strict=True):
        out.add_(tensor.to(acc_dtype), alpha=weight)
    if group.params["normalize"]:
        out.div_(torch.tensor(weights, dtype=acc_dtype).sum())
    return out.to(first.dtype)
