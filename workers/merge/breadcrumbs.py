"""Model Breadcrumbs (arXiv 2312.06795): drop each delta's largest outliers and its smallest entries.

For d_i = theta_i - theta_base with n entries, sorted by |d_i| ascending (mergekit's order, ties included):

    k = int(density_i * n),  n_top = int(gamma_i * n),  n_bot = max(0, n - k - n_top)
    d~_i = d_i at sorted positions [n_bot, n_bot + k), 0 elsewhere     (unchanged when density_i >= 1)
    (with `rescale`, d~_i *= ||d_i||_1 / ||d~_i||_1, as mergekit does)

then the task vectors are combined linearly (breadcrumbs) or with TIES sign consensus (breadcrumbs_ties):
theta = theta_base + lambda * sum_i c_i w_i d~_i / Z (see task_vectors.combine). Nothing is random.
"""

from __future__ import annotations

import torch

from workers.merge.registry import TensorGroup, register
from workers.merge.sparsify import top_k
from workers.merge.task_arithmetic import COMMON
from workers.merge.task_vectors import TaskVector, combine

MODEL_PARAMS: dict[str, float | None] = {"weight": None, "density": 1.0, "gamma": 0.01}
BOUNDS = {"gamma": (0.0, 1.0)}


def outlier_window(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """The flat 0/1 mask keeping sorted positions [n_bot, n_bot + k) of |delta| (ascending).

    The window is the top n - n_bot magnitudes less the top n - n_bot - k: two exact k-th value searches
    (no sort) give it whenever no entries tied at either edge must be split. When they must, |delta| is
    sorted on the CPU in float32 with torch's sort, as mergekit does, so the tied entries it keeps are kept.
    """
    n = delta.numel()
    k, n_top = int(density * n), int(gamma * n)
    n_bot = max(0, n - k - n_top)
    magnitude = delta.reshape(-1).abs().float()
    if k == 0:
        return torch.zeros(n, dtype=delta.dtype, device=delta.device)
    upper = top_k(magnitude, n - n_bot)
    outliers = top_k(magnitude, n - n_bot - k) if n - n_bot > k else None
    if upper.dropped == 0 and (outliers is None or outliers.dropped == 0):
        keep = magnitude >= upper.threshold
        if outliers is not None:
            keep &= magnitude < outliers.threshold
        return keep.to(delta.dtype)
    order = torch.sort(magnitude.cpu(), descending=False).indices
    keep = torch.zeros(n, dtype=delta.dtype)
    keep[order[n_bot : n_bot + k]] = 1
    return keep.to(delta.device)


def l1_ratio(delta: torch.Tensor, keep: torch.Tensor, eps: float = 1e-7) -> float:
    """||d||_1 / ||keep * d||_1 (mergekit's L1 rescale); 1 when either norm is below eps."""
    magnitude = delta.reshape(-1).abs()
    before = float(magnitude.sum(dtype=torch.float64))
    after = float((magnitude * keep).sum(dtype=torch.float64))
    return 1.0 if before < eps or after < eps else before / after


def crumbs(
    tensor: torch.Tensor, base: torch.Tensor, weight: float, density: float, gamma: float, rescale: bool
) -> TaskVector:
    """Model i's breadcrumbs task vector."""
    if density >= 1:
        return TaskVector(tensor, weight)
    delta = tensor - base
    keep = outlier_window(delta, density, gamma)
    scale = l1_ratio(delta, keep) if rescale else 1.0
    return TaskVector(tensor, weight, keep=keep.reshape(-1), scale=scale)


def _breadcrumbs(group: TensorGroup, consensus: bool) -> torch.Tensor:
    vectors = [
        crumbs(tensor, group.base, p["weight"], p["density"], p["gamma"], group.params["rescale"])
        for tensor, p in zip(group.tensors, group.model_params, strict=True)
    ]
    return combine(
        group.base,
        vectors,
        consensus=consensus,
        normalize=group.params["normalize"],
        lambda_=group.params["lambda"],
    )


@register("breadcrumbs", needs_base=True, model_params=MODEL_PARAMS, global_params=COMMON, bounds=BOUNDS)
def breadcrumbs(group: TensorGroup) -> torch.Tensor:
    return _breadcrumbs(group, consensus=False)


@register("breadcrumbs_ties", needs_base=True, model_params=MODEL_PARAMS, global_params=COMMON, bounds=BOUNDS)
def breadcrumbs_ties(group: TensorGroup) -> torch.Tensor:
    return _breadcrumbs(group, consensus=True)
