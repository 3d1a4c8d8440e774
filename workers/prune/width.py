"""Width pruning: keep the most active MLP channels and KV groups of every layer (uniform across layers,
so the result is again a plain config). Importance is read from activations on calibration text:

MLP channel j of a layer, with h = act(gate(x)) * up(x) the input of down_proj:

    s_j = sqrt(E_t[h_{t,j}^2]) * ||W_down[:, j]||_2        (RMS size of the channel's contribution)

KV group g of a layer (its key/value head and the n_rep query heads that read it), with a_t the
attention output entering o_proj and G_g the columns of those query heads:

    s_g = E_t || W_o[:, G_g] a_{t, G_g} ||_2               (size of the group's share of the output)

Query heads follow their KV group, so the pruned model keeps num_attention_heads = n_rep * num_kv_heads
and the same head_dim: GQA stays valid. The "random" mode draws the scores uniformly (seeded) instead.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from workers.prune.layers import Progress, decoder_layers, run_forward


@dataclass
class WidthScores:
    mlp: list[torch.Tensor]  # per layer, [intermediate_size]
    kv: list[torch.Tensor]  # per layer, [num_key_value_heads]


def attention_shape(model: nn.Module) -> tuple[int, int, int]:
    """(num_key_value_heads, n_rep query heads per KV head, head_dim) of the model's attention."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = config.num_key_value_heads
    return kv_heads, config.num_attention_heads // kv_heads, head_dim


def activation_scores(
    model: nn.Module, batches: Sequence[torch.Tensor], progress: Progress | None = None
) -> WidthScores:
    """s_j for every MLP channel and s_g for every KV group of every layer, from one calibration pass."""
    layers = decoder_layers(model)
    kv_heads, n_rep, head_dim = attention_shape(model)
    group = n_rep * head_dim
    h_sq = [torch.zeros(layer.mlp.down_proj.in_features, dtype=torch.float64) for layer in layers]
    kv_sum = [torch.zeros(kv_heads, dtype=torch.float64) for _ in layers]
    tokens = torch.zeros(len(layers), dtype=torch.float64)

    def mlp_hook(index: int):
        def hook(module, args):
            h = args[0].float().reshape(-1, module.in_features)
            h_sq[index] += h.square().sum(0).double().cpu()
            tokens[index] += h.shape[0]

        return hook

    def attn_hook(index: int):
        def hook(module, args):
            a = args[0].float().reshape(-1, module.in_features)
            w = module.weight.float()
            for g in range(kv_heads):
                cols = slice(g * group, (g + 1) * group)
                kv_sum[index][g] += (a[:, cols] @ w[:, cols].T).norm(dim=-1).sum().item()

        return hook

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(mlp_hook(i)))
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(attn_hook(i)))
    run_forward(model, batches, progress, "activation statistics", hooks=handles)
    if tokens.min() == 0:
        raise ValueError("no calibration tokens reached the decoder layers")
    mlp = [
        (h_sq[i] / tokens[i]).sqrt().float() * layer.mlp.down_proj.weight.detach().float().norm(dim=0).cpu()
        for i, layer in enumerate(layers)
    ]
    kv = [(kv_sum[i] / tokens[i]).float() for i in range(len(layers))]
    return WidthScores(mlp=mlp, kv=kv)


def random_scores(model: nn.Module, seed: int) -> WidthScores:
    """Uniform random scores of the same shapes: the baseline selection, reproducible from the seed."""
    generator = torch.Generator().manual_seed(seed)
    layers = decoder_layers(model)
    kv_heads = attention_shape(model)[0]
    mlp = [torch.rand(layer.mlp.down_proj.in_features, generator=generator) for layer in layers]
    kv = [torch.rand(kv_heads, generator=generator) for _ in layers]
    return WidthScores(mlp=mlp, kv=kv)


def top_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The indices of the k largest scores, in ascending index order (so kept units keep their order)."""
    if not 1 <= k <= scores.numel():
        raise ValueError(f"can keep between 1 and {scores.numel()} units, got {k}")
    return torch.topk(scores, k).indices.sort().values


def slice_linear(
    linear: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None
) -> None:
    """Keep only the given output rows and/or input columns of a Linear, in place (bias follows rows)."""
    weight = linear.weight.data
    if rows is not None:
        weight = weight[rows.to(weight.device)]
        if linear.bias is not None:
            linear.bias = nn.Parameter(linear.bias.data[rows.to(weight.device)].clone())
    if cols is not None:
        weight = weight[:, cols.to(weight.device)]
    linear.weight = nn.Parameter(weight.clone().contiguous())
    linear.out_features, linear.in_features = linear.weight.shape


def head_rows(groups: torch.Tensor, heads_per_group: int, head_dim: int) -> torch.Tensor:
    """Row (or column) indices of the heads belonging to the given groups, for a [heads * head_dim] axis."""
    heads = (groups[:, None] * heads_per_group + torch.arange(heads_per_group)).reshape(-1)
    return (heads[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)


def prune_width_(
    model: nn.Module, scores: WidthScores, intermediate_size: int, num_key_value_heads: int
) -> nn.Module:
    """In place: keep the top intermediate_size channels and top num_key_value_heads groups per layer."""
    kv_heads, n_rep, head_dim = attention_shape(model)
    for i, layer in enumerate(decoder_layers(model)):
        mlp, attn = layer.mlp, layer.self_attn
        if intermediate_size != mlp.down_proj.in_features:
            keep = top_indices(scores.mlp[i], intermediate_size)
            slice_linear(mlp.gate_proj, rows=keep)
            slice_linear(mlp.up_proj, rows=keep)
            slice_linear(mlp.down_proj, cols=keep)
            if hasattr(mlp, "intermediate_size"):
                mlp.intermediate_size = intermediate_size
        if num_key_value_heads != kv_heads:
            groups = top_indices(scores.kv[i], num_key_value_heads)
            q_rows = head_rows(groups, n_rep, head_dim)
            kv_rows = head_rows(groups, 1, head_dim)
            slice_linear(attn.q_proj, rows=q_rows)
            slice_linear(attn.k_proj, rows=kv_rows)
            slice_linear(attn.v_proj, rows=kv_rows)
            slice_linear(attn.o_proj, cols=q_rows)
    config = model.config
    config.head_dim = head_dim
    config.intermediate_size = intermediate_size
    config.num_key_value_heads = num_key_value_heads
    config.num_attention_heads = num_key_value_heads * n_rep
    return model


def prune_width(
    model: nn.Module, scores: WidthScores, intermediate_size: int, num_key_value_heads: int
) -> nn.Module:
    """A copy of the model cut to the given widths; the source is untouched."""
    return prune_width_(copy.deepcopy(model), scores, intermediate_size, num_key_value_heads)
