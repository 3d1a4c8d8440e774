"""TIES merging (arXiv 2306.01708): trim, elect sign, disjoint merge.

1. trim:  d~_i = the k = max(1, int(density_i * numel)) entries of largest |d_i| (exactly k; among
   entries tied with the k-th largest, the ones mergekit's unstable argsort keeps, or with
   `tie_break: first` the first in flat order), the rest zero
   (with `rescale`, d~_i *= ||d_i||_1 / ||d~_i||_1, as mergekit does)
2. elect: s = sign(sum_i w_i * d~_i)
3. merge: theta = theta_base + lambda * sum_i [sign(w_i d~_i) == s] w_i d~_i / sum_i [sign(w_i d~_i) == s] w_i

The k-th largest |d_i| (and the rescale) need the whole tensor; they are found first, in one read of
d_i slice by slice, and the rest is element-wise (task_vectors.combine).
"""

from __future__ import annotations

import torch

from workers.merge.registry import TensorGroup, register
from workers.merge.sparsify import (
    chunk_size,
    delta_magnitude,
    l1_rescale_factor,
    mergekit_tie_choice,
    top_k,
)
from workers.merge.task_arithmetic import COMMON
from workers.merge.task_vectors import TaskVector, combine


def trimmed(
    tensor: torch.Tensor,
    base: torch.Tensor,
    weight: float,
    density: float,
    rescale: bool,
    tie_break: str = "mergekit",
) -> TaskVector:
    """Model i's TIES task vector: its top k found on the whole delta (and the L1 rescale)."""
    if density >= 1:
        return TaskVector(tensor, weight)
    n = base.numel()
    if density <= 0 or n == 0:
        return TaskVector(tensor, weight, scale=0.0)
    k = max(1, int(density * n))
    magnitude = delta_magnitude(tensor, base)
    top = top_k(magnitude, k, n)
    if tie_break == "mergekit":
        top = mergekit_tie_choice(magnitude, k, top, n)
    scale = l1_rescale_factor(magnitude, n, k, top, chunk_size(base.device)) if rescale else 1.0
    return TaskVector(tensor, weight, top=top, scale=scale)


@register(
    "ties",
    needs_base=True,
    model_params={"weight": None, "density": 1.0},
    global_params={**COMMON, "normalize": True},
)
def ties(group: TensorGroup) -> torch.Tensor:
    rescale, tie_break = group.params["rescale"], group.params.get("tie_break", "mergekit")
    vectors = [
        trimmed(tensor, group.base, p["weight"], p["density"], rescale, tie_break)
        for tensor, p in zip(group.tensors, group.model_params, strict=True)
    ]
    return combine(
        group.base,
        vectors,
        consensus=True,
        normalize=group.params["normalize"],
        lambda_=group.params["lambda"],
    )
