"""Output agreement between two models: max |logits_a - logits_b| over probe inputs."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


@torch.inference_mode()
def max_logit_diff(a: nn.Module, b: nn.Module, batches: Iterable[torch.Tensor]) -> float:
    """max over batches, positions and vocabulary of |logits_a - logits_b|, both computed in float32."""
    worst = 0.0
    for ids in batches:
        la = a(input_ids=ids.to(next(a.parameters()).device), use_cache=False).logits.float().cpu()
        lb = b(input_ids=ids.to(next(b.parameters()).device), use_cache=False).logits.float().cpu()
        worst = max(worst, (la - lb).abs().max().item())
    return worst
