"""Passthrough: one model's tensor, unchanged or times `scale` (the building block of frankenmerges:
the slices form stacks layer ranges of models, each slice with a single source).

    theta = scale * theta_1     (scale defaults to 1: the tensor as it is)
"""

from __future__ import annotations

import torch

from workers.merge.registry import TensorGroup, register


@register("passthrough", needs_base=False, model_params={"scale": 1.0}, global_params={}, max_inputs=1)
def passthrough(group: TensorGroup) -> torch.Tensor:
    (tensor,), (params,) = group.tensors, group.model_params
    scale = params["scale"]
    return tensor if scale == 1.0 else tensor * scale
