"""DARE (arXiv 2311.03099): drop each delta entry with probability p = 1 - density, rescale the
survivors by 1 / (1 - p), then combine linearly (dare_linear) or with TIES sign consensus (dare_ties).
"""

from __future__ import annotations

import torch

from workers.merge.registry import TensorGroup, register
from workers.merge.sparsify import dare
from workers.merge.task_arithmetic import COMMON
from workers.merge.task_vectors import combine

DARE_DEFAULTS = {**COMMON, "rescale": True}


def _dare_merge(group: TensorGroup, consensus: bool) -> torch.Tensor:
    deltas = [
        dare(tensor - group.base, params["density"], generator, group.params["rescale"])
        for tensor, params, generator in zip(group.tensors, group.model_params, group.generators, strict=True)
    ]
    return combine(
        group.base,
        deltas,
        [p["weight"] for p in group.model_params],
        consensus=consensus,
        normalize=group.params["normalize"],
        lambda_=group.params["lambda"],
    )


@register(
    "dare_linear",
    needs_base=True,
    model_params={"weight": None, "density": 1.0},
    global_params=DARE_DEFAULTS,
    random=True,
)
def dare_linear(group: TensorGroup) -> torch.Tensor:
    return _dare_merge(group, consensus=False)


@register(
    "dare_ties",
    needs_base=True,
    model_params={"weight": None, "density": 1.0},
    global_params=DARE_DEFAULTS,
    random=True,
)
def dare_ties(group: TensorGroup) -> torch.Tensor:
    return _dare_merge(group, consensus=True)
