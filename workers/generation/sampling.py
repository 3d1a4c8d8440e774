"""Choosing the next token from one row of logits: greedy, or seeded top-k / top-p sampling.

Sampling draws p(x) = softmax(z / T) restricted to the top-k tokens and then to the smallest prefix of the
sorted distribution whose mass reaches top_p, renormalised. The draw is by inverse CDF with one uniform
u ~ U[0, 1) from the request's own CPU `torch.Generator`, so a request's tokens depend only on its seed and
its logits, never on which other requests share the batch or on the device.
"""

from __future__ import annotations

import torch


def seeded_generator(seed: int) -> torch.Generator:
    """A CPU generator for one request; the uniforms it yields are the same on every machine."""
    return torch.Generator(device="cpu").manual_seed(seed)


def filtered_distribution(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted probabilities and their token ids after temperature, top-k and top-p (nucleus) filtering.

    probs = softmax(z / T) sorted descending; keep the first k; keep the first m with
    sum(probs[:m-1]) < top_p (so at least one token survives); renormalise.
    """
    if temperature <= 0:
        raise ValueError("temperature must be positive for sampling")
    scaled = logits.float() / temperature
    if 0 < top_k < scaled.shape[-1]:
        scaled, token_ids = torch.topk(scaled, top_k)
    else:
        scaled, token_ids = torch.sort(scaled, descending=True)
    probs = torch.softmax(scaled, dim=-1)
    if top_p < 1.0:
        mass_before = torch.cumsum(probs, dim=-1) - probs
        keep = int((mass_before < top_p).sum().item())
        probs, token_ids = probs[: max(keep, 1)], token_ids[: max(keep, 1)]
    return probs / probs.sum(), token_ids


def sample_token(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float, generator: torch.Generator | None
) -> int:
    """Greedy argmax when temperature == 0, else the inverse-CDF draw x = ids[min{i : cdf_i > u}]."""
    if temperature == 0:
        return int(torch.argmax(logits).item())
    probs, token_ids = filtered_distribution(logits, temperature, top_k, top_p)
    u = torch.rand((), generator=generator).item()
    cdf = torch.cumsum(probs, dim=-1).cpu()
    index = int(torch.searchsorted(cdf, torch.tensor([u], dtype=cdf.dtype), right=True).item())
    return int(token_ids[min(index, token_ids.shape[0] - 1)].item())
