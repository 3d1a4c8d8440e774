"""DARE (arXiv 2311.03099): drop each delta entry with probability p = 1 - density, rescale the
survivors by 1 / (1 - p), then combine linearly (dare_linear) or with TIES sign consensus (dare_ties).

    d~_i = m_i * d_i / density_i,   m_i ~ Bernoulli(density_i), drawn on the CPU from the (tensor, model) seed
"""

from __future__ import annotations

import torch

from workers.merge.registry import TensorGroup, register
from workers.merge.task_arithmetic import COMMON
from workers.merge.task_vectors import TaskVector, combine

DARE_DEFAULTS = {**COMMON, "rescale": True}


def dropped(
    tensor: torch.Tensor, weight: float, density: float, generator: torch.Generator, rescale: bool
) -> TaskVector:
    """Model i's DARE task vector; its mask is sparsify.bernoulli_mask's for the same generator."""
    if density >= 1:
        return TaskVector(tensor, weight)
    divisor = density if rescale else 1.0
    return TaskVector(tensor, weight, generator=generator, density=density, divisor=divisor)


def _dare_merge(group: TensorGroup, consensus: bool) -> torch.Tensor:
    vectors = [
        dropped(tensor, p["weight"], p["density"], generator, group.params["rescale"])
        for tensor, p, generator in zip(group.tensors, group.model_params, group.generators, strict=True)
    ]
    return combine(
        group.base,
        vectors,
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
