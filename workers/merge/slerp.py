"""Spherical linear interpolation between two models (Shoemake 1985), as mergekit 0.1.5 computes it.

slerp (base model theta_0, other model theta_1, whole tensors flattened to vectors, in float32):

    cos(Omega) = <theta_0 / |theta_0|, theta_1 / |theta_1|>          (a norm <= 1e-8 counts as 1)
    theta = sin((1 - t) Omega) / sin(Omega) * theta_0 + sin(t Omega) / sin(Omega) * theta_1
    theta = (1 - t) theta_0 + t theta_1                               when |cos(Omega)| > 0.9995

nuslerp (two models a, b with weights w_a, w_b; t = w_b / (w_a + w_b), or 1/2 when |w_a + w_b| < 1e-6):
the same interpolation in the inputs' dtype, over the whole flattened tensor (`nuslerp_flatten`, the
default), else over each row (the last dimension), or each column with `nuslerp_row_wise`; vectors are
normalized with norms clamped at 1e-7 and colinear ones (1 - cos^2 <= 1e-16) interpolated linearly. With a
base model it interpolates the task vectors: theta = theta_base + nuslerp(t, a - theta_base, b - theta_base).
"""

from __future__ import annotations

import torch

from workers.merge.registry import TensorGroup, register

DOT_THRESHOLD = 0.9995
NORM_EPS = 1e-8


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """SLERP of two whole tensors, statistics and arithmetic in float32 (float64 inputs stay float64);
    the result has v0's dtype.

    Each statistic is one fused reduction over the whole tensor (two norms, one dot product: no
    normalised copies, no product temporary) and the result is one multiply and one multiply-add into a
    fresh tensor, so memory holds the inputs and the output only, and few large kernels run (many small
    ones cost more than they compute when the cores are shared)."""
    dtype = torch.float64 if v0.dtype == torch.float64 else torch.float32
    a, b = v0.reshape(-1).to(dtype), v1.reshape(-1).to(dtype)
    if a.numel() == 0:
        return torch.empty_like(v0)
    t_ = torch.tensor(t, dtype=dtype, device=v0.device)
    norm_a, norm_b = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    norm_a = torch.where(norm_a > NORM_EPS, norm_a, 1)
    norm_b = torch.where(norm_b > NORM_EPS, norm_b, 1)
    dot = (torch.linalg.vecdot(a, b) / (norm_a * norm_b)).clamp(-1, 1)
    if dot.abs() > DOT_THRESHOLD:
        coef_a, coef_b = 1 - t_, t_
    else:
        theta = torch.acos(dot)
        sin_theta = torch.sin(theta)
        coef_a = torch.sin((1 - t_) * theta) / sin_theta
        coef_b = torch.sin(t_ * theta) / sin_theta
    out = torch.mul(a, coef_a)
    out.add_(b, alpha=float(coef_b))
    return out.reshape(v0.shape).to(v0.dtype)


@register(
    "slerp",
    needs_base=True,
    model_params={},
    global_params={"t": None},
    min_inputs=2,
    max_inputs=2,
    bounds={"t": (0.0, 1.0)},
)
def slerp_merge(group: TensorGroup) -> torch.Tensor:
    return slerp(group.params["t"], group.base, group.tensors[0])


def nuslerp(t: float, v0: torch.Tensor, v1: torch.Tensor, row_wise: bool, flatten: bool) -> torch.Tensor:
    """NuSLERP of two tensors along the last dimension (after the reshapes `row_wise`/`flatten` ask for):
    the angles come from norms and dot products, then one pass writes c_0 v_0 + c_1 v_1 per vector."""
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    dim = 0 if row_wise and not flatten else -1
    n0 = torch.linalg.vector_norm(v0, dim=dim, keepdim=True).clamp(min=1e-7)
    n1 = torch.linalg.vector_norm(v1, dim=dim, keepdim=True).clamp(min=1e-7)
    cos_theta = (torch.linalg.vecdot(v0, v1, dim=dim).unsqueeze(dim) / (n0 * n1)).clamp(-1, 1)
    colinear = (1 - cos_theta.square()) <= NORM_EPS**2
    theta = torch.acos(torch.where(colinear, 0, cos_theta))
    sin_theta = torch.sin(theta)
    c0 = torch.where(colinear, 1 - t, torch.sin((1 - t) * theta) / sin_theta)
    c1 = torch.where(colinear, t, torch.sin(t * theta) / sin_theta)
    result = (v0 * c0).addcmul_(v1, c1)
    return result.reshape(shape)


@register(
    "nuslerp",
    needs_base=False,
    base="optional",
    model_params={"weight": None},
    global_params={"nuslerp_row_wise": False, "nuslerp_flatten": True},
    min_non_base=2,
    max_non_base=2,
)
def nuslerp_merge(group: TensorGroup) -> torch.Tensor:
    w_a, w_b = (p["weight"] for p in group.model_params)
    total = w_a + w_b
    t = 0.5 if abs(total) < 1e-6 else w_b / total
    row_wise, flatten = group.params["nuslerp_row_wise"], group.params["nuslerp_flatten"]
    a, b = group.tensors
    if group.base is None:
        return nuslerp(t, a, b, row_wise, flatten)
    return group.base + nuslerp(t, a - group.base, b - group.base, row_wise, flatten)
