"""NearSwap: take the other model's value where it is near the base's, keep the base's elsewhere.

    w = clamp(t / max(|theta_base - theta_1|, 1e-6), 0, 1)
    theta = w * theta_1 + (1 - w) * theta_base

(entries closer than t are swapped in whole; farther ones move toward theta_1 by t / distance).
"""

from __future__ import annotations

import torch

from workers.merge.registry import TensorGroup, register


@register("nearswap", needs_base=True, model_params={}, global_params={"t": None}, min_inputs=2, max_inputs=2)
def nearswap(group: TensorGroup) -> torch.Tensor:
    a, b = group.base, group.tensors[0]
    # t / d as torch computes a number over a tensor: t * (1 / d)
    weight = torch.sub(a, b).abs_().clamp_(min=1e-6).reciprocal_().mul_(group.params["t"]).clamp_(0, 1)
    out = weight * b
    return out.add_(weight.neg_().add_(1).mul_(a))  # w b + (1 - w) a, in two buffers
