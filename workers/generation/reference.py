"""Naive greedy decoding at an exit depth, without any cache: the ground truth for the engine.

Each step recomputes the whole sequence,  x_{t+1} = argmax LMHead(FinalNorm(h_k(x_1..x_t)))_t,
so it costs O(T^2) layer passes but cannot suffer from cache bookkeeping errors.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from workers.early_exit.forward import exit_logits


@torch.inference_mode()
def greedy_reference(
    model: nn.Module,
    prompt_ids: Sequence[int],
    depth: int,
    max_new_tokens: int,
    eos_token_ids: Iterable[int] = (),
) -> list[int]:
    """Up to `max_new_tokens` greedy tokens at `depth`; stops before (and excludes) an EOS token."""
    eos = set(eos_token_ids)
    device = next(model.parameters()).device
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
    generated: list[int] = []
    for _ in range(max_new_tokens):
        token = int(exit_logits(model, ids, depth)[0, -1].argmax().item())
        if token in eos:
            break
        generated.append(token)
        ids = torch.cat([ids, ids.new_tensor([[token]])], dim=1)
    return generated
