"""Function-preserving MLP width growth (Net2Net, arXiv 1511.05641; FPI in bert2BERT, arXiv 2110.07143).

Each new channel j copies an existing channel g(j) (the first I0 channels map to themselves, the extra
ones to channels drawn uniformly without replacement, seeded, starting a fresh permutation every I0
channels). Up to 2x growth no channel has more than two copies, so the division below is by 1 or 2 and
exact in binary floating point. With c_k = |{j : g(j) = k}| copies of channel k:

    W_gate'[j, :] = W_gate[g(j), :]      W_up'[j, :] = W_up[g(j), :]
    W_down'[:, j] = W_down[:, g(j)] / c_{g(j)}

Every copy of channel k computes the same h_k, and the c_k copies together add c_k * (h_k W_down[:, k] / c_k),
so the MLP output is unchanged up to float rounding.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from workers.prune.layers import decoder_layers


def channel_map(intermediate: int, new_intermediate: int, seed: int) -> torch.Tensor:
    """g: new channel index -> source channel index (identity on the first `intermediate`)."""
    if new_intermediate < intermediate:
        raise ValueError(f"new size {new_intermediate} is below the current {intermediate}; use pruning")
    generator = torch.Generator().manual_seed(seed)
    rounds = -(-(new_intermediate - intermediate) // intermediate) if intermediate else 0
    draws = [torch.randperm(intermediate, generator=generator) for _ in range(rounds)]
    extra = torch.cat(draws)[: new_intermediate - intermediate] if draws else torch.empty(0, dtype=torch.long)
    return torch.cat([torch.arange(intermediate), extra])


def _set(linear: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    linear.weight = nn.Parameter(weight.contiguous())
    if bias is not None:
        linear.bias = nn.Parameter(bias.contiguous())
    linear.out_features, linear.in_features = linear.weight.shape


def widen_mlp_(mlp: nn.Module, mapping: torch.Tensor) -> None:
    """In place: replicate channels by `mapping`, splitting each down_proj column evenly among its copies."""
    device = mlp.down_proj.weight.device
    g = mapping.to(device)
    copies = torch.bincount(g, minlength=mlp.down_proj.in_features)[g]
    with torch.no_grad():
        for linear in (mlp.gate_proj, mlp.up_proj):
            _set(linear, linear.weight[g].clone(), None if linear.bias is None else linear.bias[g].clone())
        down = mlp.down_proj.weight
        _set(mlp.down_proj, (down[:, g].float() / copies.float()).to(down.dtype), None)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = mapping.numel()


def grow_mlp_width(model: nn.Module, intermediate_size: int, seed: int = 0) -> nn.Module:
    """A copy of the model with every layer's MLP widened to `intermediate_size` channels."""
    grown = copy.deepcopy(model)
    for index, layer in enumerate(decoder_layers(grown)):
        mapping = channel_map(layer.mlp.down_proj.in_features, intermediate_size, seed + index)
        widen_mlp_(layer.mlp, mapping)
    grown.config.intermediate_size = intermediate_size
    return grown
