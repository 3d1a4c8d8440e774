"""Block influence of each decoder layer (ShortGPT, arXiv 2403.03853):

    BI_i = 1 - E_{x, t} [ cos(X_{i,t}, X_{i+1,t}) ]

X_i is the residual stream entering layer i and X_{i+1} the one leaving it, read with forward hooks on
the decoder layers themselves (not from output_hidden_states, whose last entry is taken after the final
norm). A layer that barely turns its input has low influence and is the first candidate for removal.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from workers.prune.layers import Progress, decoder_layers, run_forward


def _hidden(value: object) -> torch.Tensor:
    """The hidden-state tensor out of a layer's input args or output (older layers return a tuple)."""
    return value[0] if isinstance(value, tuple | list) else value


def block_influence(
    model: torch.nn.Module, batches: Sequence[torch.Tensor], progress: Progress | None = None
) -> list[float]:
    """BI_i for every decoder layer i, averaged over every token of every calibration batch."""
    layers = decoder_layers(model)
    cos_sum = torch.zeros(len(layers), dtype=torch.float64)
    tokens = torch.zeros(len(layers), dtype=torch.float64)

    def hook_for(index: int):
        def hook(module, args, kwargs, output):
            x = _hidden(args) if args else kwargs["hidden_states"]
            cos = F.cosine_similarity(x.float(), _hidden(output).float(), dim=-1)
            cos_sum[index] += cos.sum().item()
            tokens[index] += cos.numel()

        return hook

    handles = [layer.register_forward_hook(hook_for(i), with_kwargs=True) for i, layer in enumerate(layers)]
    run_forward(model, batches, progress, "block influence", hooks=handles)
    if tokens.min() == 0:
        raise ValueError("no calibration tokens reached the decoder layers")
    return (1.0 - cos_sum / tokens).tolist()
