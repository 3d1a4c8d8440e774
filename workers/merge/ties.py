"""TIES merging (arXiv 2306.01708): trim, elect sign, disjoint merge.

1. trim:  d~_i = top-k(|d_i|) of each delta, k = density_i * numel
2. elect: s = sign(sum_i w_i * d~_i)
   (with `rescale`, d~_i *= ||d_i||_1 / ||d~_i||_1, as mergekit does)
3. merge: theta = theta_base + lambda * sum_i [sign(w_i d~_i) == s] w_i d~_i / sum_i [sign(w_i d~_i) == s] w_i
"""

from __future__ import annotations

import torch

from workers.merge.registry import TensorGroup, register
from workers.merge.sparsify import l1_rescale, magnitude_mask
from workers.merge.task_arithmetic import COMMON
from workers.merge.task_vectors import combine


@register(
    "ties",
    needs_base=True,
    model_params={"weight": None, "density": 1.0},
    global_params={**COMMON, "normalize": True},
)
def ties(group: TensorGroup) -> torch.Tensor:
    deltas = []
    for tensor, params in zip(group.tensors, group.model_params, strict=True):
        delta = tensor - group.base
        trimmed = delta * magnitude_mask(delta, params["density"])
        deltas.append(l1_rescale(delta, trimmed) if group.params["rescale"] else trimmed)
    return combine(
        group.base,
        deltas,
        [p["weight"] for p in group.model_params],
        consensus=True,
        normalize=group.params["normalize"],
        lambda_=group.params["lambda"],
    )
