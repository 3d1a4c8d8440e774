"""Model Stock (arXiv 2403.19522), as mergekit 0.1.5 computes it, one tensor at a time.

For the base theta_0 and N >= 2 fine-tunes theta_i, over the whole flattened tensor (or each row, with
`filter_wise`; a 1-D tensor is one row):

    cos = mean over pairs i < j of <d_i, d_j> / max(|d_i| |d_j|, 1e-6),  d_i = theta_i - theta_0
    t = N cos / (1 + (N - 1) cos)      (t = 0, the base kept, when |1 + (N - 1) cos| < 1e-6)
    theta = t * mean_i theta_i + (1 - t) * theta_0
"""

from __future__ import annotations

import torch

from workers.merge.registry import TensorGroup, register


@register(
    "model_stock",
    needs_base=True,
    model_params={},
    global_params={"filter_wise": False},
    min_inputs=3,
)
def model_stock(group: TensorGroup) -> torch.Tensor:
    """Whole-tensor kernels, few and fused: a fused reduction per norm and per dot product (no product
    temporaries), the task vectors d_i as the only full-size temporaries, and the result accumulated in
    place in one fresh tensor."""
    w_0, ws = group.base, list(group.tensors)
    shape = w_0.shape
    if group.params["filter_wise"]:
        if w_0.dim() == 1:
            w_0, ws = w_0.unsqueeze(0), [w.unsqueeze(0) for w in ws]
    else:
        w_0, ws = w_0.reshape(-1), [w.reshape(-1) for w in ws]
    offsets = [w - w_0 for w in ws]
    norms = [torch.linalg.vector_norm(d, dim=-1) for d in offsets]
    cosines = []
    for i, a in enumerate(offsets):
        for j in range(i + 1, len(offsets)):
            dot = torch.linalg.vecdot(a, offsets[j], dim=-1)
            cosines.append((dot / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1))
    del offsets
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    count = len(ws)
    denominator = 1 + (count - 1) * cos
    singular = denominator.abs() < 1e-6
    t = torch.where(
        singular,
        torch.zeros_like(cos),
        (count * cos) / torch.where(singular, torch.ones_like(denominator), denominator),
    )
    out = ws[0].clone()  # t * mean_i theta_i + (1 - t) * theta_0
    for w in ws[1:]:
        out.add_(w)
    out.div_(count).mul_(t)
    out.addcmul_(w_0, 1 - t)
    return out.reshape(shape)
