"""Depth pruning: drop whole decoder layers, the n with the lowest block influence (ShortGPT),
or n chosen uniformly at random (seeded) as the baseline to beat.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from workers.prune.layers import decoder_layers, keep_layers


def least_influential(influence: Sequence[float], n: int) -> list[int]:
    """Indices of the n smallest influence scores (ties broken by the lower index), ascending."""
    if not 0 <= n < len(influence):
        raise ValueError(f"can remove between 0 and {len(influence) - 1} layers, got {n}")
    order = sorted(range(len(influence)), key=lambda i: (influence[i], i))
    return sorted(order[:n])


def random_layers(num_layers: int, n: int, seed: int) -> list[int]:
    """n distinct layer indices drawn uniformly at random, reproducible from the seed."""
    if not 0 <= n < num_layers:
        raise ValueError(f"can remove between 0 and {num_layers - 1} layers, got {n}")
    generator = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(num_layers, generator=generator)[:n].tolist())


def drop_layers(model: nn.Module, remove: Iterable[int]) -> nn.Module:
    """A copy of the model without the layers at `remove`; the rest keep their order and are renumbered."""
    gone = set(remove)
    n = len(decoder_layers(model))
    if any(not 0 <= i < n for i in gone):
        raise ValueError(f"layer indices must lie in [0, {n})")
    return keep_layers(model, [i for i in range(n) if i not in gone])
