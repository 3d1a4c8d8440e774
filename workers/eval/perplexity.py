"""Perplexity over non-overlapping windows, at full depth or at an early exit.

    PPL = exp( (1/N) * sum_w sum_{t=1}^{L_w-1} -log p(x_{w,t} | x_{w,<t}) ),   N = sum_w (L_w - 1)

Windows do not overlap and carry no context from the previous window, so the first token of each window
is only ever context, never a target.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from workers.early_exit.forward import exit_logits
from workers.eval.texts import Encoder, encode, windows


def logits_at(model: nn.Module, ids: torch.Tensor, depth: int | None = None) -> torch.Tensor:
    """Logits of the full model (depth=None) or of the exit after `depth` decoder layers."""
    if depth is None:
        return model(input_ids=ids, use_cache=False).logits
    return exit_logits(model, ids, depth)


@torch.inference_mode()
def window_nll(model: nn.Module, window: torch.Tensor, depth: int | None = None) -> tuple[float, int]:
    """(sum of next-token NLL, number of predicted tokens) for one (1, L) window."""
    ids = window.to(next(model.parameters()).device)
    logits = logits_at(model, ids, depth)[:, :-1].float()
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
    return nll.item(), ids.shape[1] - 1


def perplexity_of_ids(
    model: nn.Module, ids: torch.Tensor, seq_len: int = 256, depth: int | None = None
) -> float:
    """Perplexity of a 1-D id sequence cut into non-overlapping windows of seq_len tokens."""
    total, count = 0.0, 0
    for window in windows(ids, seq_len):
        nll, n = window_nll(model, window, depth)
        total, count = total + nll, count + n
    if count == 0:
        raise ValueError("text too short: need at least two tokens")
    return math.exp(total / count)


def perplexity(
    model: nn.Module, tokenizer: Encoder, text: str, seq_len: int = 256, depth: int | None = None
) -> float:
    """Perplexity of `text` under the model (full depth when depth is None, else the exit at `depth`)."""
    return perplexity_of_ids(model, encode(tokenizer, text), seq_len, depth)
