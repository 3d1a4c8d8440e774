"""Function-preserving depth growth (LLaMA Pro, arXiv 2401.02415): insert a copy of layer i right after
layer i, with the copy's o_proj and down_proj (and their biases) set to zero. A LLaMA layer computes

    h' = h + Attn(Norm1(h)),   h'' = h' + MLP(Norm2(h'))

and with zero output projections both branches add exactly 0, so the grown model computes the same
logits bit for bit. Training then moves the zero projections and the new layers start to contribute.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from workers.prune.layers import decoder_layers, restack


def zero_output(layer: nn.Module) -> nn.Module:
    """Zero the projections that write into the residual stream: self_attn.o_proj and mlp.down_proj."""
    with torch.no_grad():
        for linear in (layer.self_attn.o_proj, layer.mlp.down_proj):
            linear.weight.zero_()
            if linear.bias is not None:
                linear.bias.zero_()
    return layer


def grow_depth(model: nn.Module, after: Sequence[int]) -> nn.Module:
    """A copy of the model with an identity copy of layer i inserted after layer i for each i in `after`.

    Indices refer to the source's layers; repeating an index inserts several copies after it.
    """
    old = list(decoder_layers(model))
    if not after or any(not 0 <= i < len(old) for i in after):
        raise ValueError(f"give one or more layer indices in [0, {len(old)})")
    grown = copy.deepcopy(model)
    kept = list(decoder_layers(grown))
    layers: list[nn.Module] = []
    sources: list[int] = []
    for i, layer in enumerate(kept):
        layers.append(layer)
        sources.append(i)
        for _ in range(list(after).count(i)):
            layers.append(zero_output(copy.deepcopy(layer)))
            sources.append(i)
    return restack(grown, layers, sources)
