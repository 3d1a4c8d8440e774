"""The early-exit forward pass of a LLaMA-family causal LM (Sorted LLaMA, arXiv 2309.08968).

An exit at depth k runs decoder layers 1..k, then the model's shared final norm and shared LM head:

    logits_k = LMHead(FinalNorm(h_k)),   h_k = Layer_k(... Layer_1(Embed(x)))

All exits share one copy of the weights; nothing here mutates the model or its config.
This module computes without a KV cache: it is the reference that cached engines are checked against,
and the forward pass that Sorted Fine-Tuning and per-exit quality evaluation use.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from transformers.masking_utils import create_causal_mask

from workers.early_exit.adapters import ExitAdapters


def decoder_stack(model: nn.Module) -> nn.Module:
    """The inner decoder (`model.model` for *ForCausalLM), holding embed_tokens, layers, norm, rotary_emb."""
    inner = getattr(model, "model", model)
    for part in ("embed_tokens", "layers", "norm"):
        if not hasattr(inner, part):
            raise TypeError(f"{type(model).__name__} has no LLaMA-style decoder ({part} missing)")
    return inner


def num_layers(model: nn.Module) -> int:
    return len(decoder_stack(model).layers)


def check_depth(model: nn.Module, depth: int) -> int:
    n = num_layers(model)
    if not 1 <= depth <= n:
        raise ValueError(f"depth must be between 1 and {n}, got {depth}")
    return depth


def residual_at_exits(
    model: nn.Module,
    input_ids: torch.Tensor,
    exits: Iterable[int],
    attention_mask: torch.Tensor | None = None,
) -> dict[int, torch.Tensor]:
    """The residual stream h_k (before the final norm) for each k in `exits`, from one pass through
    max(exits) layers. k = 0 is the embedding output, k = n the last layer's output. This is the one
    place that collects hidden states at chosen layers (exit adapters, block replacement, exits)."""
    n = num_layers(model)
    wanted = sorted(set(exits))
    if not wanted or wanted[0] < 0 or wanted[-1] > n:
        raise ValueError(f"layers must be between 0 and {n}, got {wanted}")
    inner = decoder_stack(model)
    hidden = inner.embed_tokens(input_ids)
    out: dict[int, torch.Tensor] = {0: hidden} if wanted[0] == 0 else {}
    if wanted[-1] == 0:
        return out
    position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
    mask = create_causal_mask(
        config=inner.config,
        inputs_embeds=hidden,
        attention_mask=attention_mask,
        past_key_values=None,
        position_ids=position_ids,
    )
    position_embeddings = inner.rotary_emb(hidden, position_ids=position_ids)
    for index, layer in enumerate(inner.layers[: wanted[-1]]):
        hidden = layer(
            hidden,
            attention_mask=mask,
            position_embeddings=position_embeddings,
            position_ids=position_ids,
            use_cache=False,
        )
        if index + 1 in wanted:
            out[index + 1] = hidden
    return out


def hidden_at_exits(
    model: nn.Module,
    input_ids: torch.Tensor,
    exits: Iterable[int],
    attention_mask: torch.Tensor | None = None,
    adapters: ExitAdapters | None = None,
) -> dict[int, torch.Tensor]:
    """Normed hidden states FinalNorm(h_k) (s_k FinalNorm(A_k h_k + b_k) where `adapters` has exit k) for
    each exit k, from one pass through max(exits) layers."""
    wanted = sorted({check_depth(model, k) for k in exits})
    inner = decoder_stack(model)
    residual = residual_at_exits(model, input_ids, wanted, attention_mask)
    if adapters is None:
        return {k: inner.norm(h) for k, h in residual.items()}
    return {k: adapters.head_input(h, k, inner.norm) for k, h in residual.items()}


def exit_logits(
    model: nn.Module,
    input_ids: torch.Tensor,
    depth: int,
    attention_mask: torch.Tensor | None = None,
    adapters: ExitAdapters | None = None,
) -> torch.Tensor:
    """Logits of the exit at `depth` for every position, computed without a cache (with the exit's adapter
    when `adapters` has one)."""
    normed = hidden_at_exits(model, input_ids, [depth], attention_mask, adapters)[depth]
    return model.lm_head(normed)
