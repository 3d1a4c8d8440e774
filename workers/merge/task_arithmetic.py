"""Task arithmetic (arXiv 2212.04089): theta = theta_base + lambda * sum_i w_i * (theta_i - theta_base)."""

from __future__ import annotations

import torch

from workers.merge.registry import TensorGroup, register
from workers.merge.task_vectors import TaskVector, combine

COMMON = {"normalize": False, "lambda": 1.0, "rescale": False, "int8_mask": False}


@register("task_arithmetic", needs_base=True, model_params={"weight": None}, global_params=COMMON)
def task_arithmetic(group: TensorGroup) -> torch.Tensor:
    vectors = [TaskVector(t, p["weight"]) for t, p in zip(group.tensors, group.model_params, strict=True)]
    return combine(
        group.base,
        vectors,
        consensus=False,
        normalize=group.params["normalize"],
        lambda_=group.params["lambda"],
    )
