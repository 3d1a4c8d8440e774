"""Shared helpers for the prune / grow tests."""

import torch


def logits(model, batches):
    """Logits of the model on each batch, concatenated along the batch axis."""
    with torch.no_grad():
        return torch.cat([model(input_ids=ids, use_cache=False).logits for ids in batches])
