"""DELLA (arXiv 2406.11617): MAGPRUNE drops each delta entry with a probability that falls with its
magnitude rank, rescales the survivors, then merges (della: TIES sign consensus; della_linear: linear).

For d_i = theta_i - theta_base, row by row (a 1-D tensor is one row), with r_j in 1..m the rank of |d_ij|
in its row of m entries (ascending; ties ordered as torch's sort orders them, as in mergekit):

    p_ij = (density_i - epsilon_i) + 2 * epsilon_i * (r_j - 1) / (m - 1)     (keep probability)
    d~_ij = m_ij * d_ij / p_ij,   m_ij ~ Bernoulli(p_ij), drawn on the CPU from the (tensor, model) seed

(p_ij = density_i in a row of one entry), so E[d~_i] = d_i entry by entry; with `rescale: false`,
d~_ij = m_ij * d_ij. The kept fraction is density_i on average (a row's p_ij average to density_i).
density_i >= 1 keeps d_i unchanged. Then theta = theta_base + lambda * sum_i c_i w_i d~_i / Z
(see task_vectors.combine).

mergekit 0.1.5 computes the same p_ij but draws the mask from torch's global generator and rescales by
the ratio of L1 norms ||d_i||_1 / ||d~_i||_1, which equals the paper's 1 / p_ij only on average.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from workers.merge.registry import TensorGroup, register
from workers.merge.sparsify import CHUNK
from workers.merge.task_arithmetic import COMMON
from workers.merge.task_vectors import TaskVector, combine

MODEL_PARAMS: dict[str, float | None] = {"weight": None, "density": 1.0, "epsilon": 0.15}
BOUNDS = {"epsilon": (0.0, 0.5)}


def keep_probabilities(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """p_ij (float32, flat in row-major order) for a delta, rows taken a block at a time."""
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta.reshape(delta.shape[0], -1)
    n_rows, m = rows.shape
    out = torch.empty(n_rows, m, dtype=torch.float32, device=delta.device)
    block = max(1, (16 * CHUNK) // max(m, 1))
    for start in range(0, n_rows, block):
        chunk = rows[start : start + block]
        order = torch.argsort(chunk.abs(), dim=1, descending=False)
        ranks = torch.empty_like(order, dtype=torch.float32)
        steps = torch.arange(1, m + 1, dtype=torch.float32, device=delta.device).expand_as(ranks)
        ranks.scatter_(1, order, steps)  # the inverse permutation: the rank of each entry, from 1
        low, high = ranks.min(dim=1, keepdim=True).values, ranks.max(dim=1, keepdim=True).values
        normalized = ((ranks - low) / (high - low)).clamp(0, 1)
        if m == 1:  # one-entry rows: mergekit divides 0 by 0; the entry keeps probability density
            normalized.fill_(0.5)
        out[start : start + block] = (density - epsilon) + normalized * 2 * epsilon
    return out.reshape(-1)


def magpruned(
    tensor: torch.Tensor,
    base: torch.Tensor,
    weight: float,
    density: float,
    epsilon: float,
    generator: torch.Generator,
    rescale: bool,
) -> TaskVector:
    """Model i's DELLA task vector; its mask is the next draws of `generator` below p."""
    if density >= 1:
        return TaskVector(tensor, weight)
    probs = keep_probabilities(tensor - base, density, epsilon)
    return TaskVector(tensor, weight, generator=generator, probs=probs, divide_by_probs=rescale)


def check_epsilon(numbers: Callable[[str], list[float]]) -> str | None:
    """density +/- epsilon must stay inside (0, 1) wherever density < 1 (mergekit raises otherwise)."""
    densities = [d for d in numbers("density") if d < 1]
    epsilon = max(numbers("epsilon"), default=0.0)
    if densities and not (min(densities) - epsilon > 0 and max(densities) + epsilon < 1):
        return f"epsilon {epsilon} puts density +/- epsilon outside (0, 1) (density {densities})"
    return None


def _della(group: TensorGroup, consensus: bool) -> torch.Tensor:
    vectors = [
        magpruned(
            tensor, group.base, p["weight"], p["density"], p["epsilon"], generator, group.params["rescale"]
        )
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
    "della",
    needs_base=True,
    model_params=MODEL_PARAMS,
    global_params={**COMMON, "normalize": True, "rescale": True},
    random=True,
    bounds=BOUNDS,
    check=check_epsilon,
)
def della(group: TensorGroup) -> torch.Tensor:
    return _della(group, consensus=True)


@register(
    "della_linear",
    needs_base=True,
    model_params=MODEL_PARAMS,
    global_params={**COMMON, "rescale": True},
    random=True,
    bounds=BOUNDS,
    check=check_epsilon,
)
def della_linear(group: TensorGroup) -> torch.Tensor:
    return _della(group, consensus=False)
