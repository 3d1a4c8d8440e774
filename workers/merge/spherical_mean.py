"""Weighted means of many models on the unit hypersphere, scaled back by the weighted mean norm
(mergekit 0.1.5's multislerp and karcher). Each tensor is one flattened vector.

multislerp (weights w_i, normalized to sum 1 with `normalize_weights`; with a base model the vectors are the
task vectors x_i = theta_i - theta_base, and theta_base is added back):

    u_i = x_i / (|x_i| + eps),  m = sum_i w_i u_i / |sum_i w_i u_i|
    v = sum_i w_i (u_i - <u_i, m> m),  n = |v| + eps
    theta = (cos(n) m + sin(n) / n * v) * sum_i w_i |x_i|

(when |sum_i w_i u_i| < eps: two models fall back to w_0 x_0 + w_1 x_1, more are an error).

karcher (every input, a_i = 1/N; vectors with |theta_i| <= tol are left out of the mean, their a_i
renormalized over the rest): the Riemannian (Karcher) mean m of u_i = theta_i / |theta_i|, found from
m_0 = normalize(sum_i a_i u_i) by at most `max_iter` steps
    g = sum_i a_i Omega_i / sin(Omega_i) (u_i - cos(Omega_i) m), cos(Omega_i) = <m, u_i> (Omega_i >= tol)
    m <- normalize(cos(|g|) m + sin(|g|) g / |g|)      until |g| < tol;
then theta = (sum_i a_i |theta_i|) m (all inputs' norms, a_i = 1/N).
"""

from __future__ import annotations

import torch

from workers.merge.registry import TensorGroup, register


@register(
    "multislerp",
    needs_base=False,
    base="optional",
    model_params={"weight": None},
    global_params={"normalize_weights": True, "eps": 1e-8},
    min_non_base=1,
)
def multislerp(group: TensorGroup) -> torch.Tensor:
    if len(group.tensors) == 1:
        return group.tensors[0]
    base = group.base
    stacked = torch.stack(group.tensors, dim=0)
    if base is not None:
        stacked -= base
    flat = stacked.view(stacked.shape[0], -1)
    eps = group.params["eps"]
    weights = torch.tensor(
        [p["weight"] for p in group.model_params], dtype=stacked.dtype, device=stacked.device
    )
    if group.params["normalize_weights"]:
        weights = weights / weights.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * weights.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if stacked.shape[0] != 2:
            raise ValueError(
                f"multislerp: the weighted sum of the inputs of {group.name} is zero (antipodal inputs "
                "whose weights cancel); change the weights"
            )
        result = (stacked[0] * weights[0] + stacked[1] * weights[1]).view(stacked.shape[1:])
        return result if base is None else result + base
    mean = mean / mean_norm
    dots = (units * mean).sum(-1, keepdim=True)
    tangents = units - dots * mean
    tangent = (tangents * weights.view(-1, 1)).sum(0)
    tangent_norm = torch.norm(tangent) + eps
    result = mean * torch.cos(tangent_norm) + tangent * (torch.sin(tangent_norm) / tangent_norm)
    result = (result * (norms.squeeze(-1) * weights).sum()).view(stacked.shape[1:])
    return result if base is None else result + base


def karcher_mean(tensors: list[torch.Tensor], alphas: list[float], max_iter: int, tol: float) -> torch.Tensor:
    if len(tensors) == 1:
        return tensors[0]
    dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    norms = [torch.linalg.vector_norm(x.to(dtype)) for x in tensors]
    units = [
        torch.zeros_like(x) if n.item() == 0.0 else (x / n).to(x.dtype)
        for x, n in zip(tensors, norms, strict=True)
    ]
    valid = [i for i, n in enumerate(norms) if n.item() > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    total = sum(alphas[i] for i in valid)
    weights = [alphas[i] / total for i in valid]
    points = [units[i] for i in valid]

    mean = torch.zeros_like(points[0])
    for w, u in zip(weights, points, strict=True):
        mean += w * u
    mean_norm = torch.linalg.vector_norm(mean.to(dtype))
    mean = points[0].clone() if mean_norm.item() < tol else (mean / mean_norm).to(mean.dtype)
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for w, u in zip(weights, points, strict=True):
            dot = torch.clamp(torch.dot(mean.flatten(), u.flatten()), -1.0, 1.0)
            omega = torch.arccos(dot)
            if omega.item() < tol:
                continue
            tangent += w * (omega / torch.sin(omega)) * (u - dot * mean)
        tangent_norm = torch.linalg.vector_norm(tangent.to(dtype))
        if tangent_norm.item() < tol:
            break
        mean = (torch.cos(tangent_norm) * mean + torch.sin(tangent_norm) * (tangent / tangent_norm)).to(
            mean.dtype
        )
        unit_norm = torch.linalg.vector_norm(mean.to(dtype))
        if unit_norm.item() > tol:
            mean = (mean / unit_norm).to(mean.dtype)
    scale = sum(a * n for a, n in zip(alphas, norms, strict=True))
    return scale * mean


@register(
    "karcher",
    needs_base=False,
    model_params={},
    global_params={"max_iter": 10, "tol": 1e-5},
    bounds={"max_iter": (0, 1000), "tol": (0.0, 1.0)},
)
def karcher(group: TensorGroup) -> torch.Tensor:
    n = len(group.tensors)
    return karcher_mean(group.tensors, [1.0 / n] * n, int(group.params["max_iter"]), group.params["tol"])
