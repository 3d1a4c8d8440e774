"""Editing the decoder-layer stack of a LLaMA-style model: the one place that keeps the module list,
the per-layer cache indices and the config in agreement.

After `restack(model, order)` the model holds layers [L_{order[0]}, L_{order[1]}, ...]:
  - config.num_hidden_layers = len(order),
  - config.layer_types (where the architecture has it) = [layer_types[i] for i in order],
  - every submodule's `layer_idx` (the KV-cache slot) = its new position.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from workers.early_exit.forward import decoder_stack

Progress = Callable[[int, int, str], None]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return decoder_stack(model).layers


def renumber(layer: nn.Module, index: int) -> None:
    """Point every `layer_idx` inside a decoder layer at its new position in the stack."""
    for module in layer.modules():
        if hasattr(module, "layer_idx"):
            module.layer_idx = index


def restack(model: nn.Module, layers: Sequence[nn.Module], sources: Sequence[int]) -> nn.Module:
    """Install `layers` as the decoder stack in place; sources[i] is the old index layer i came from."""
    if len(layers) != len(sources) or not layers:
        raise ValueError("need one source index per layer, and at least one layer")
    config = model.config
    old_types = getattr(config, "layer_types", None)
    decoder_stack(model).layers = nn.ModuleList(layers)
    for index, layer in enumerate(layers):
        renumber(layer, index)
    config.num_hidden_layers = len(layers)
    if old_types is not None:
        config.layer_types = [old_types[i] for i in sources]
    return model


def keep_layers(model: nn.Module, keep: Sequence[int]) -> nn.Module:
    """A copy of the model holding only the layers at `keep` (in the given order); the source is untouched."""
    n = len(decoder_layers(model))
    if any(not 0 <= i < n for i in keep):
        raise ValueError(f"layer indices must lie in [0, {n})")
    out = copy.deepcopy(model)
    old = list(decoder_layers(out))
    return restack(out, [old[i] for i in keep], list(keep))


def run_forward(
    model: nn.Module,
    batches: Sequence[torch.Tensor],
    progress: Progress | None = None,
    message: str = "calibration",
    hooks: Sequence[RemovableHandle] = (),
) -> None:
    """Feed each batch of ids through the model once (for the hooks that are listening), no grad, no cache;
    then remove `hooks`, also when a batch fails."""
    device = next(model.parameters()).device
    try:
        with torch.inference_mode():
            for done, ids in enumerate(batches):
                model(input_ids=ids.to(device), use_cache=False)
                if progress is not None:
                    progress(done + 1, len(batches), message)
    finally:
        for handle in hooks:
            handle.remove()
