"""The exit pointer: a continuous cache over an exit's own states, mixed into the exit's distribution with a
weight inferred from the context (arXiv 1612.04426's cache, with Bayesian mixture weights).

A shallow exit misses what the full model gets by copying from its context (option names, defined terms,
repeated phrases: most of a specification or a manual). The pointer supplies it cheaply. With s_i the exit's
state at position i (the residual h_k, centred and scaled to unit length) and x the tokens,

    q_t(y) = sum_{i < t, x_(i+1) = y} softmax_i(theta s_t . s_i)

points at what followed the earlier positions most like this one. The exit then predicts

    p_t(y) = (1 - m_t) p_k,t(y) + m_t q_t(y),   m_t = sum_j w_t,j lambda_j,

a mixture whose weight is the posterior mean over a fixed grid of weights lambda_j: w_1 = prior and, each time
the next token x_(t+1) is known, w_(t+1),j is proportional to w_t,j ((1 - lambda_j) p_k,t(x_(t+1)) + lambda_j
q_t(x_(t+1))). On text with nothing to copy the posterior moves towards lambda = 0 and the exit is as
before; on copy-heavy text it moves towards the larger weights. Per exit, theta and the prior are fitted on
the fitting text (`fit_pointer`); full depth never has a pointer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

LAMBDAS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.45, 0.6)  # the grid of mixture weights the posterior ranges over
THETAS = (10.0, 15.0, 20.0, 30.0)  # inverse temperatures fitting chooses from
MAX_THETA = 100.0
EVIDENCE = 256  # at most this many known tokens of a prompt update the posterior (the scoring window)


def prior_family() -> list[tuple[float, ...]]:
    """Priors fitting chooses from: uniform over LAMBDAS, or mass c on lambda = 0 and the rest spread."""
    n = len(LAMBDAS)
    out = [tuple([1.0 / n] * n)]
    for c in (0.5, 0.8, 0.95):
        out.append((c, *([(1.0 - c) / (n - 1)] * (n - 1))))
    return out


@dataclass(frozen=True)
class ExitPointer:
    """One exit's pointer: the inverse temperature and the prior over LAMBDAS."""

    theta: float
    prior: tuple[float, ...]

    def __post_init__(self) -> None:
        if not (math.isfinite(self.theta) and 0 < self.theta <= MAX_THETA):
            raise ValueError(f"a pointer's theta must lie in (0, {MAX_THETA:g}]")
        if len(self.prior) != len(LAMBDAS) or not all(math.isfinite(p) and p >= 0 for p in self.prior):
            raise ValueError(f"a pointer's prior must be {len(LAMBDAS)} finite weights >= 0")
        if not abs(sum(self.prior) - 1.0) < 1e-4:
            raise ValueError("a pointer's prior must sum to 1")
        # held as the float32 values it is stored as, so a pointer read back is the one fitted
        values = torch.tensor([self.theta, *self.prior], dtype=torch.float32).tolist()
        object.__setattr__(self, "theta", values[0])
        object.__setattr__(self, "prior", tuple(values[1:]))

    def as_tensor(self) -> torch.Tensor:
        return torch.tensor([self.theta, *self.prior], dtype=torch.float32)

    @classmethod
    def from_tensor(cls, values: torch.Tensor) -> ExitPointer:
        flat = [float(v) for v in values.flatten().tolist()]
        if len(flat) != 1 + len(LAMBDAS):
            raise ValueError("a stored pointer has the wrong size")
        return cls(flat[0], tuple(flat[1:]))


def pointer_keys(hidden: torch.Tensor) -> torch.Tensor:
    """s = (h - mean(h)) / ||h - mean(h)|| over the last dimension, in float32."""
    h = hidden.float()
    return F.normalize(h - h.mean(-1, keepdim=True), dim=-1)


def _lambdas(device: torch.device) -> torch.Tensor:
    return torch.tensor(LAMBDAS, dtype=torch.float64, device=device)


def copy_attention(keys: torch.Tensor, theta: float) -> torch.Tensor:
    """(T, T) weights: row t is softmax_i(theta s_t . s_i) over i < t (row 0 is all zeros)."""
    scores = theta * (keys @ keys.T)
    causal = torch.ones_like(scores, dtype=torch.bool).tril(-1)
    weights = torch.softmax(scores.masked_fill(~causal, float("-inf")), -1)
    return torch.nan_to_num(weights, nan=0.0)


def mixture_weights(
    exit_probs: torch.Tensor, copy_probs: torch.Tensor, prior: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """For the known next tokens of positions 0..T-1 of a window, with exit probabilities p_k,t and pointer
    probabilities q_t (both (T,)): the mixture weight m_t each prediction used (T,) and the posterior over
    LAMBDAS after all T. Position 0 has no earlier state to point at: it is not mixed and teaches nothing."""
    lambdas = _lambdas(exit_probs.device)
    likelihood = (1 - lambdas) * exit_probs.double()[:, None] + lambdas * copy_probs.double()[:, None]
    likelihood[:1] = 1.0
    log_prior = torch.tensor(prior, dtype=torch.float64, device=exit_probs.device).clamp_min(1e-300).log()
    # log w_t = log prior + sum_{s < t} log likelihood_s (normalised)
    seen = torch.cat([torch.zeros_like(likelihood[:1]), likelihood.clamp_min(1e-300).log().cumsum(0)])
    posterior = torch.softmax(log_prior + seen, -1)  # (T + 1, J)
    mix = posterior[:-1] @ lambdas
    mix[:1] = 0.0
    return mix, posterior[-1]


def score_window(
    keys: torch.Tensor, exit_logprobs: torch.Tensor, next_ids: torch.Tensor, pointer: ExitPointer
) -> torch.Tensor:
    """Teacher-forced log-probabilities (T, V) of the exit with its pointer over one window: `keys` (T, d)
    from `pointer_keys`, `exit_logprobs` (T, V) the exit's own, `next_ids` (T,) the tokens that follow."""
    attention = copy_attention(keys, pointer.theta)
    copy = torch.zeros_like(exit_logprobs).index_add_(1, next_ids, attention.to(exit_logprobs.dtype))
    rows = torch.arange(next_ids.numel(), device=next_ids.device)
    mix, _ = mixture_weights(exit_logprobs[rows, next_ids].exp(), copy[rows, next_ids], pointer.prior)
    mix = mix.to(exit_logprobs.dtype)[:, None]
    return torch.log((1 - mix) * exit_logprobs.exp() + mix * copy).clamp_min(-1e4)


def score_targets(
    keys: torch.Tensor, logits: torch.Tensor, next_ids: torch.Tensor, pointer: ExitPointer
) -> tuple[torch.Tensor, torch.Tensor]:
    """What `score_window` gives a teacher-forced scoring, without its (T, V) tensors: the log-probability
    of each next token (T,) and each position's most probable token (T,), of the exit with its pointer, from
    the exit's logits (T, V). The pointer's distribution lives on the window's next tokens alone (U <= T
    distinct ones), so the mixture is read there and at the exit's own argmax."""
    rows = torch.arange(next_ids.numel(), device=next_ids.device)
    logits = logits.float()
    lse = torch.logsumexp(logits, -1)
    best, top = logits.max(-1)
    distinct, slot = torch.unique(next_ids, return_inverse=True)
    attention = copy_attention(keys, pointer.theta)  # (T, T)
    copy = torch.zeros(attention.shape[0], distinct.numel(), device=logits.device)
    copy.index_add_(1, slot, attention.float())  # q_t at the distinct next tokens (T, U)
    exit_probs = (logits[:, distinct] - lse[:, None]).exp()  # p_k,t at the distinct next tokens (T, U)
    mix, _ = mixture_weights(exit_probs[rows, slot], copy[rows, slot], pointer.prior)
    mix = mix.float()[:, None]
    mixed = (1 - mix) * exit_probs + mix * copy  # (T, U)
    target = torch.log(mixed[rows, slot]).clamp_min(-1e4)
    # the exit's argmax, unless a token the pointer supports now beats it (its value there includes q_t)
    at_top = (1 - mix[:, 0]) * (best - lse).exp()
    on_top = distinct[None, :] == top[:, None]
    at_top = torch.where(on_top.any(-1), (mixed * on_top).sum(-1), at_top)
    value, index = mixed.max(-1)
    return target, torch.where(value > at_top, distinct[index], top)


@dataclass
class PointerState:
    """One sequence's pointer while it is decoded: the keys of the positions whose next token is known, those
    tokens, and the posterior over LAMBDAS. `mix` reads the distribution at a new position (the query);
    `observe` then records the token that followed it."""

    pointer: ExitPointer
    keys: torch.Tensor  # (n, d)
    values: torch.Tensor  # (n,) token ids
    posterior: torch.Tensor  # (len(LAMBDAS),) float64
    _pending: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # query, exit probs, copy probs

    @staticmethod
    def evidence(pointer: ExitPointer, keys: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        """Which of a prompt's last min(T - 1, EVIDENCE) tokens the posterior needs the exit's probability of,
        (E,) bool: those the pointer gives a probability above 0. Where it gives 0 the likelihood of every
        lambda_j is (1 - lambda_j) p_k,t, and p_k,t cancels when the posterior is normalised, so the exit's
        head (the costly part) runs only where the pointer has something to say."""
        evidence = min(prompt.numel() - 1, EVIDENCE)
        if evidence < 1:
            return torch.zeros(0, dtype=torch.bool, device=keys.device)
        return copy_hits(keys[-evidence - 1 : -1], prompt[-evidence:], pointer.theta) > 0

    @classmethod
    def from_prompt(
        cls, pointer: ExitPointer, keys: torch.Tensor, prompt: torch.Tensor, seen: torch.Tensor
    ) -> PointerState:
        """After a prompt of T tokens: `keys` (T, d) from `pointer_keys` of its exit states, `prompt` (T,),
        and `seen` (E,): the exit's probabilities of the prompt's last E = min(T - 1, EVIDENCE) tokens, each
        at the position before it, which update the posterior; needed only where `evidence` is True (any
        value elsewhere). The last key is the first query (`mix`)."""
        evidence = min(prompt.numel() - 1, EVIDENCE)
        if seen.numel() != max(evidence, 0):
            raise ValueError("seen must hold one probability per token of evidence")
        posterior = torch.tensor(pointer.prior, dtype=torch.float64, device=keys.device)
        if evidence > 0:
            targets = prompt[-evidence:]
            hits = copy_hits(keys[-evidence - 1 : -1], targets, pointer.theta)
            seen = torch.where(hits > 0, seen.to(hits.dtype), torch.ones_like(hits))
            _, posterior = mixture_weights(seen, hits, pointer.prior)
        return cls(pointer, keys[:-1], prompt[1:], posterior)

    def mix(self, logits: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """Mixed log-probabilities (V,) at a position with the exit's `logits` (V,) and key `query` (d,)."""
        probs = torch.softmax(logits.float(), -1)
        copy = torch.zeros_like(probs)
        if self.values.numel():
            attention = torch.softmax(self.pointer.theta * (self.keys @ query), -1)
            copy.index_add_(0, self.values, attention.to(probs.dtype))
        self._pending = (query, probs, copy)
        mix = float(self.posterior @ _lambdas(self.posterior.device)) if self.values.numel() else 0.0
        return torch.log((1 - mix) * probs + mix * copy).clamp_min(-1e4)

    def observe(self, token: int) -> None:
        """The token that followed the last `mix`'s position: the posterior learns from it and the position
        joins the keys."""
        if self._pending is None:
            raise RuntimeError("observe needs a mix first")
        query, probs, copy = self._pending
        self._pending = None
        if self.values.numel():  # with nothing to point at the prediction was the exit's: no evidence
            lambdas = _lambdas(self.posterior.device)
            likelihood = (1 - lambdas) * float(probs[token]) + lambdas * float(copy[token])
            posterior = self.posterior * likelihood
            self.posterior = posterior / posterior.sum().clamp_min(1e-300)
        self.keys = torch.cat([self.keys, query[None]])
        self.values = torch.cat([self.values, torch.tensor([token], device=self.values.device)])


def copy_hits(keys: torch.Tensor, next_ids: torch.Tensor, theta: float) -> torch.Tensor:
    """q_t(x_(t+1)) at every position t of a window: `keys` (T, d), `next_ids` (T,) the tokens that follow."""
    attention = copy_attention(keys, theta)
    return (attention * (next_ids[None, :] == next_ids[:, None])).sum(-1)


def fit_pointer(
    windows: Sequence[tuple[torch.Tensor, dict[float, torch.Tensor]]],
) -> tuple[ExitPointer, float, float]:
    """The (theta, prior) of THETAS x prior_family() with the least mean NLL over fitting windows, each (the
    exit's probabilities of the next tokens (T,), `copy_hits` by theta for every theta of THETAS); with the
    mean NLL without a pointer and with the chosen one."""
    tokens = sum(int(seen.numel()) for seen, _ in windows)
    if not tokens:
        raise ValueError("no fitting tokens for the pointer")
    base = -sum(float(seen.double().clamp_min(1e-300).log().sum()) for seen, _ in windows) / tokens
    best: tuple[float, ExitPointer] | None = None
    for theta in THETAS:
        for prior in prior_family():
            nll = 0.0
            for seen, hits in windows:
                mix, _ = mixture_weights(seen, hits[theta], prior)
                p = (1 - mix) * seen.double() + mix * hits[theta].double()
                nll -= float(p.clamp_min(1e-300).log().sum())
            if best is None or nll / tokens < best[0]:
                best = (nll / tokens, ExitPointer(theta, prior))
    assert best is not None
    return best[1], base, best[0]
