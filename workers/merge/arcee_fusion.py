"""Arcee Fusion: keep the other model's change only where it matters most (mergekit 0.1.5).

    importance = |theta_1 - theta_0| * KL(softmax(theta_1) || softmax(theta_0))   (softmax and KL per row,
                 the last dimension; probabilities + 1e-8)
    threshold  = median + 1.5 * (q3 - q1)   of importance (quantile q: the sorted entry at int(q * (n - 1)))
    theta = theta_0 + (theta_1 - theta_0) * [importance >= threshold]

Above 1,000,000 entries the quantiles come from 1,000,000 entries drawn with replacement (as mergekit
does), from the tensor's seeded generator, so a merge is reproducible.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from workers.merge.registry import TensorGroup, register

QUANTILE_SAMPLE = 1_000_000


def importance(params: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """|params - base| times the row's KL divergence, mergekit's arithmetic in three buffers."""
    p = F.softmax(params, dim=-1).add_(1e-8)
    q = F.softmax(base, dim=-1).add_(1e-8)
    kl = torch.sum(torch.div(p, q, out=q).log_().mul_(p), dim=-1, keepdim=True)
    del p, q
    return torch.sub(params, base).abs_().mul_(kl)


def quantiles(values: torch.Tensor, q: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    flat = values.reshape(-1)
    if flat.numel() > QUANTILE_SAMPLE:
        picks = torch.randint(flat.numel(), (QUANTILE_SAMPLE,), generator=generator)
        flat = flat[picks.to(flat.device)]
    ordered, _ = torch.sort(flat)
    return ordered[(q.to(ordered.device) * (ordered.numel() - 1)).long()]


@register(
    "arcee_fusion",
    needs_base=True,
    model_params={},
    global_params={},
    random=True,
    min_inputs=2,
    max_inputs=2,
)
def arcee_fusion(group: TensorGroup) -> torch.Tensor:
    base, other = group.base, group.tensors[0]
    scores = importance(other, base)
    generator = group.generators[0] if group.generators else None
    q1, median, q3 = quantiles(scores, torch.tensor([0.25, 0.5, 0.75]), generator)
    mask = (scores >= median + 1.5 * (q3 - q1)).to(base.dtype)
    return base + (other - base) * mask
