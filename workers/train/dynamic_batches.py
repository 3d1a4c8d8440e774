"""Dynamic batch loading (LLM-Shearing, arXiv 2310.06694, Algorithm 1): train on several data domains with
sampling weights that follow how far each domain's loss is from its reference loss.

Every m steps, with l_d the model's current loss on domain d's dev windows and r_d its reference loss
(the source model's loss on the same windows):

    a_d = w_d * exp(eta * max(l_d - r_d, 0)),   w_d <- (1 - c) * a_d / sum_e a_e + c / D

(eta = 1 and the smoothing c = 1e-4 follow the paper's code, after DoReMi), so domains that recover slowly
get more of the batches. With `update_every=None` the weights stay fixed (the fixed-mix baseline).

Each domain's token stream is cut into windows; its last 2 x `heldout_windows` windows are held out of
training: the first half is the dev set the weights are updated from, the second the test set results are
reported on.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from workers.train.data import Batch, EncodedExample, collate

ETA = 1.0
SMOOTHING = 1e-4


def update_weights(
    weights: Sequence[float],
    losses: Sequence[float],
    references: Sequence[float],
    eta: float = ETA,
    smoothing: float = SMOOTHING,
) -> list[float]:
    """w_d <- (1 - c) w_d exp(eta max(l_d - r_d, 0)) / Z + c / D (module docstring)."""
    if not len(weights) == len(losses) == len(references) or not weights:
        raise ValueError("need one weight, loss and reference per domain")
    values = [*weights, *losses, *references]
    if not all(math.isfinite(v) for v in values) or min(weights) < 0 or sum(weights) <= 0:
        raise ValueError("weights, losses and references must be finite, weights >= 0 and not all 0")
    gaps = [max(loss - ref, 0.0) for loss, ref in zip(losses, references, strict=True)]
    top = max(gaps)  # exp(eta (g - top)): the same ratios, no overflow
    raw = [w * math.exp(eta * (g - top)) for w, g in zip(weights, gaps, strict=True)]
    total = sum(raw)
    if total <= 0:
        raw, total = list(weights), sum(weights)
    n = len(weights)
    return [(1 - smoothing) * r / total + smoothing / n for r in raw]


@dataclass
class Domain:
    """One domain's training windows and its held-out dev and test windows, each a 1-D id tensor."""

    name: str
    train: list[torch.Tensor]
    dev: list[torch.Tensor]
    test: list[torch.Tensor]


def split_domain(name: str, ids: Sequence[int], seq_len: int, heldout_windows: int) -> Domain:
    """Cut a domain's stream into seq_len windows: the last 2 x heldout_windows held out (dev, then test)."""
    stream = torch.tensor(list(ids), dtype=torch.long)
    windows = [stream[i : i + seq_len] for i in range(0, stream.numel() - seq_len + 1, seq_len)]
    if len(windows) < 2 * heldout_windows + 1:
        raise ValueError(
            f"domain {name!r} has {len(windows)} windows of {seq_len} tokens; it needs at least "
            f"{2 * heldout_windows + 1} ({heldout_windows} dev, {heldout_windows} test, 1 to train on)"
        )
    cut = len(windows) - 2 * heldout_windows
    return Domain(name, windows[:cut], windows[cut : cut + heldout_windows], windows[cut + heldout_windows :])


def _row(ids: torch.Tensor) -> EncodedExample:
    values = ids.tolist()
    return EncodedExample(values, values)


class DomainSampler:
    """Endless batches: each row's domain drawn by the current weights (seeded), then that domain's next
    training window (each domain cycles through its windows in a seeded shuffled order)."""

    def __init__(self, domains: Sequence[Domain], weights: Sequence[float], batch_size: int, seed: int = 0):
        if len(domains) != len(weights) or not domains:
            raise ValueError("need one weight per domain")
        self.domains, self.batch_size = list(domains), batch_size
        self.weights = [w / sum(weights) for w in weights]
        self.rng = random.Random(seed)
        self.orders = [self.rng.sample(range(len(d.train)), len(d.train)) for d in self.domains]
        self.positions = [0] * len(self.domains)
        self.drawn = [0] * len(self.domains)

    def _next_window(self, d: int) -> torch.Tensor:
        if self.positions[d] == len(self.orders[d]):
            self.rng.shuffle(self.orders[d])
            self.positions[d] = 0
        window = self.domains[d].train[self.orders[d][self.positions[d]]]
        self.positions[d] += 1
        return window

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        picks = self.rng.choices(range(len(self.domains)), weights=self.weights, k=self.batch_size)
        for d in picks:
            self.drawn[d] += 1
        return collate([_row(self._next_window(d)) for d in picks])


@torch.no_grad()
def domain_losses(model: nn.Module, windows: Mapping[str, Sequence[torch.Tensor]]) -> dict[str, float]:
    """Token-mean next-token cross-entropy of the model on each domain's windows, in eval mode."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = {}
    try:
        for name, rows in windows.items():
            total, count = 0.0, 0
            for ids in rows:
                ids = ids.view(1, -1).to(device)
                logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
                total += float(F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum"))
                count += ids.shape[1] - 1
            out[name] = total / count
    finally:
        model.train(was_training)
    return out


@dataclass
class DynamicLoading:
    """The sampler plus its update rule, called after every optimiser step (`step(done)`): every
    `update_every` steps the weights are recomputed from the dev losses. Records the weights and gaps."""

    sampler: DomainSampler
    model: nn.Module
    references: dict[str, float]
    update_every: int | None
    eta: float = ETA
    history: list[dict] = field(default_factory=list)

    def snapshot(self, done: int, losses: dict[str, float] | None = None) -> None:
        names = [d.name for d in self.sampler.domains]
        entry: dict = {
            "step": done,
            "weights": dict(zip(names, [round(w, 6) for w in self.sampler.weights], strict=True)),
        }
        if losses is not None:
            entry["loss_gap"] = {n: round(losses[n] - self.references[n], 5) for n in names}
        self.history.append(entry)

    def step(self, done: int) -> None:
        if not self.update_every or done % self.update_every:
            return
        domains = self.sampler.domains
        losses = domain_losses(self.model, {d.name: d.dev for d in domains})
        self.sampler.weights = update_weights(
            self.sampler.weights,
            [losses[d.name] for d in domains],
            [self.references[d.name] for d in domains],
            self.eta,
        )
        self.snapshot(done, losses)


def dynamic_loading(
    model: nn.Module,
    reference: nn.Module | Mapping[str, float],
    domains: Sequence[Domain],
    weights: Sequence[float] | None,
    batch_size: int,
    update_every: int | None,
    seed: int = 0,
    eta: float = ETA,
) -> DynamicLoading:
    """The sampler over `domains` (initial weights: uniform) with reference losses from `reference` (a model,
    scored on each domain's dev windows, or the losses themselves); `eta` is the update's step size."""
    if isinstance(reference, nn.Module):
        references = domain_losses(reference, {d.name: d.dev for d in domains})
    else:
        references = {d.name: float(reference[d.name]) for d in domains}
    sampler = DomainSampler(domains, weights or [1.0] * len(domains), batch_size, seed)
    loading = DynamicLoading(sampler, model, references, update_every, eta)
    loading.snapshot(0)
    return loading
