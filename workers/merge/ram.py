"""RAM, Reinforced Agent Merging (arXiv 2601.13572): entries only one model changed keep that change;
entries several models changed get the mean of their changes. No per-model weights.

For task vectors d_i = theta_i - theta_base (the base excluded even when listed), entry by entry:

    n_i = [|d_i| > epsilon],   c = sum_i n_i
    theta = theta_base + sum_i n_i d_i * ([c == 1] * lambda_i + [c > 1] / c)

ram: lambda_i = 1. ramplus_tl (tensor-local RAM+) rewards a model whose changes overlap the others' in
this tensor: with S_i = #(n_i and c > 1), U_i = #(n_i and c == 1),

    lambda_i = 1 + r * clamp(S_i / max(U_i, epsilon), 0, alpha)
"""

from __future__ import annotations

import torch

from workers.merge.registry import TensorGroup, register

BOUNDS = {"epsilon": (0.0, 1e3), "r": (0.0, 1e3), "alpha": (0.0, 1e3)}


def _ram(group: TensorGroup, plus: bool) -> torch.Tensor:
    base = group.base
    if not group.tensors:
        return base
    eps = group.params["epsilon"]
    deltas = [t - base for t in group.tensors]
    changed = [d.abs() > eps for d in deltas]  # n_i
    count = torch.zeros_like(base, dtype=torch.int64)
    for n in changed:
        count += n
    unique, shared = count == 1, count > 1
    lambdas = [1.0] * len(deltas)
    if plus:
        s = torch.tensor([int((n & shared).sum()) for n in changed])
        u = torch.tensor([int((n & unique).sum()) for n in changed])
        rho = s / u.clamp(min=eps)
        lambdas = (1 + group.params["r"] * rho.clamp(min=0, max=group.params["alpha"])).tolist()
    divisor = count.clamp(min=1).to(base.dtype)
    merged = torch.zeros_like(base)
    for d, n, lam in zip(deltas, changed, lambdas, strict=True):
        d.mul_(n)
        merged += torch.where(unique, d * lam, d / divisor)
    return base + merged


@register("ram", needs_base=True, model_params={}, global_params={"epsilon": 1e-5}, bounds=BOUNDS)
def ram(group: TensorGroup) -> torch.Tensor:
    return _ram(group, plus=False)


@register(
    "ramplus_tl",
    needs_base=True,
    model_params={},
    global_params={"r": 0.1, "alpha": 0.2, "epsilon": 1e-5},
    bounds=BOUNDS,
)
def ramplus_tl(group: TensorGroup) -> torch.Tensor:
    return _ram(group, plus=True)
