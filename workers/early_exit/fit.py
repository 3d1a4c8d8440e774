"""Fitting exit adapters: a closed-form ridge regression per exit, streamed over the data, then (optionally)
KL distillation from the full model with the base frozen.

Ridge (identity-centred). For exit k < L, with residual streams x = h_k and y = h_L (d-dimensional) over the
fitting tokens, the adapter (A, b) minimises

    sum_t ||y_t - A x_t - b||^2 + lambda ||A - I||_F^2,     lambda = ridge * mean_i (X^T X)_ii.

Writing A = I + D and z = [x, 1], the solution is W = [D^T; b^T] = (Z^T Z + lambda P)^{-1} Z^T (Y - X), with
P = diag(1, ..., 1, 0) (the bias is not shrunk). Only Z^T Z ((d+1) x (d+1)) and Z^T (Y - X) ((d+1) x d) are
accumulated, in float64, so memory is O(d^2) per exit whatever the number of tokens; all exits come from one
forward pass per batch (`residual_at_exits`). A zero lambda with too few tokens falls back to the least-norm
solution.

Distillation. Starting from the ridge solution, each adapter is refined by Adam on

    KL(p_L || p_k),   p_k = softmax(LMHead(FinalNorm(A x + b))),   p_L = softmax(LMHead(FinalNorm(h_L))),

averaged over tokens, with the model frozen (only A and b train). The residual streams of a seeded subset of
the fitting tokens are cached once (`distill_tokens` of them), so each step costs only the norm and the head.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from workers.early_exit.adapters import Affine, ExitAdapters
from workers.early_exit.forward import decoder_stack, num_layers, residual_at_exits

Progress = Callable[[str, float], None]


@dataclass(frozen=True)
class FitConfig:
    ridge: float = 1e-4  # lambda as a fraction of the mean diagonal of X^T X
    distill_steps: int = 0  # Adam steps of KL distillation per exit after the ridge fit (0: none)
    lr: float = 1e-4  # Adam learning rate of the distillation
    distill_batch_tokens: int = 256  # tokens per distillation step
    distill_tokens: int = 8192  # fitting tokens whose residual streams are cached for distillation
    batch_windows: int = 4  # token windows per forward pass
    skip_first: int = 1  # positions left out at the start of every window (the attention sink)
    distill_exits: tuple[int, ...] | None = None  # exits distilled (None: every fitted exit)
    seed: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.ridge) and self.ridge >= 0):
            raise ValueError("ridge must be finite and >= 0")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError("lr must be finite and > 0")
        if self.distill_steps < 0 or self.distill_batch_tokens < 1 or self.distill_tokens < 1:
            raise ValueError("distill_steps must be >= 0, distill_batch_tokens and distill_tokens >= 1")
        if self.batch_windows < 1 or self.skip_first < 0:
            raise ValueError("batch_windows must be >= 1 and skip_first >= 0")


@dataclass
class FitResult:
    adapters: ExitAdapters  # the final adapters (distilled where distillation ran)
    ridge: ExitAdapters  # the closed-form solution alone
    report: FitReport


@dataclass
class FitReport:
    exits: list[int]
    tokens: int  # tokens the ridge fit saw (per exit)
    windows: int
    seconds_forward: float = 0.0  # forward passes and Gram accumulation
    seconds_solve: float = 0.0
    seconds_distill: float = 0.0
    ridge_mse: dict[int, float] = field(default_factory=dict)  # mean ||y - A x - b||^2 / d on the fit data
    identity_mse: dict[int, float] = field(default_factory=dict)  # mean ||y - x||^2 / d (no adapter)
    distill_kl: dict[int, tuple[float, float]] = field(default_factory=dict)  # (first, last) step KL

    def as_dict(self) -> dict:
        return {
            "exits": self.exits,
            "tokens": self.tokens,
            "windows": self.windows,
            "seconds": {
                "forward": round(self.seconds_forward, 2),
                "solve": round(self.seconds_solve, 2),
                "distill": round(self.seconds_distill, 2),
            },
            "ridge_mse": {k: round(v, 6) for k, v in self.ridge_mse.items()},
            "identity_mse": {k: round(v, 6) for k, v in self.identity_mse.items()},
            "distill_kl": {k: [round(a, 5), round(b, 5)] for k, (a, b) in self.distill_kl.items()},
        }


class RidgeAccumulator:
    """Sufficient statistics of the identity-centred ridge fit y ~ A x + b: Z^T Z, Z^T (Y - X) and sums of
    squares, in float64 (Z = [X, 1])."""

    def __init__(self, hidden_size: int, device: torch.device | str = "cpu") -> None:
        d = hidden_size
        self.hidden_size = d
        self.gram = torch.zeros(d + 1, d + 1, dtype=torch.float64, device=device)
        self.cross = torch.zeros(d + 1, d, dtype=torch.float64, device=device)
        self.residual_sq = torch.zeros((), dtype=torch.float64, device=device)  # sum ||y - x||^2
        self.tokens = 0

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add token pairs: x, y of shape (n, d)."""
        if x.shape != y.shape or x.ndim != 2 or x.shape[1] != self.hidden_size:
            raise ValueError(
                f"expected two (n, {self.hidden_size}) tensors, got {tuple(x.shape)}, {tuple(y.shape)}"
            )
        x64 = x.to(self.gram.device, torch.float64)
        r64 = y.to(self.gram.device, torch.float64) - x64
        z = torch.cat([x64, torch.ones(x64.shape[0], 1, dtype=torch.float64, device=x64.device)], dim=1)
        self.gram.addmm_(z.T, z)
        self.cross.addmm_(z.T, r64)
        self.residual_sq += (r64 * r64).sum()
        self.tokens += x.shape[0]

    def penalty(self, ridge: float) -> float:
        d = self.hidden_size
        return ridge * float(torch.diagonal(self.gram)[:d].mean())

    def solve(self, ridge: float) -> tuple[Affine, float]:
        """(A, b) and the fit's mean squared error per coordinate on the accumulated tokens."""
        if self.tokens == 0:
            raise ValueError("no tokens were accumulated")
        d = self.hidden_size
        lam = self.penalty(ridge)
        system = self.gram.clone()
        system.diagonal()[:d] += lam
        try:
            solution = torch.linalg.solve(system, self.cross)
        except RuntimeError:  # singular: too few tokens and no ridge
            solution = torch.linalg.lstsq(system.cpu(), self.cross.cpu(), driver="gelsd").solution
            solution = solution.to(self.gram.device)
        # ||R - Z W||^2 = ||R||^2 - 2 tr(W^T Z^T R) + tr(W^T Z^T Z W)
        sse = self.residual_sq - 2 * (solution * self.cross).sum() + (solution * (self.gram @ solution)).sum()
        weight = torch.eye(d, dtype=torch.float64, device=solution.device) + solution[:d].T
        bias = solution[d]
        mse = max(float(sse), 0.0) / (self.tokens * d)
        return Affine(weight.float().cpu(), bias.float().cpu()), mse

    def identity_mse(self) -> float:
        return float(self.residual_sq) / max(self.tokens * self.hidden_size, 1)


def token_windows(
    ids: Sequence[int], seq_len: int, max_tokens: int | None = None, dtype: torch.dtype = torch.long
) -> list[torch.Tensor]:
    """Consecutive non-overlapping windows of exactly seq_len tokens (1-D LongTensors) covering at most
    max_tokens tokens; a shorter tail is kept only when it is the whole text."""
    if seq_len < 2:
        raise ValueError("seq_len must be at least 2")
    ids = list(ids)[:max_tokens] if max_tokens is not None else list(ids)
    windows = [
        torch.tensor(ids[i : i + seq_len], dtype=dtype) for i in range(0, len(ids) - seq_len + 1, seq_len)
    ]
    if not windows and len(ids) >= 2:
        windows = [torch.tensor(ids, dtype=dtype)]
    if not windows:
        raise ValueError("the fitting data has fewer than two tokens")
    return windows


def default_fit_exits(layers: int) -> list[int]:
    """Every exit below full depth: 1..L-1."""
    return list(range(1, layers))


def _report(progress: Progress | None, message: str, fraction: float) -> None:
    if progress is not None:
        progress(message, min(max(fraction, 0.0), 1.0))


def _distill_selection(windows: int, positions: int, budget: int, seed: int) -> dict[int, torch.Tensor]:
    """Which (window, position) pairs are cached for distillation: a seeded uniform subset of `budget`."""
    total = windows * positions
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(total, generator=generator)[: min(budget, total)].sort().values
    out: dict[int, torch.Tensor] = {}
    for w in chosen.div(positions, rounding_mode="floor").unique().tolist():
        mask = chosen.div(positions, rounding_mode="floor") == w
        out[w] = chosen[mask] % positions
    return out


@torch.no_grad()
def _accumulate(
    model: nn.Module,
    windows: Sequence[torch.Tensor],
    masks: Sequence[torch.Tensor] | None,
    exits: Sequence[int],
    cached_exits: Sequence[int],
    config: FitConfig,
    cache_for: dict[int, torch.Tensor] | None,
    progress: Progress | None,
) -> tuple[dict[int, RidgeAccumulator], dict[int, list[torch.Tensor]], list[torch.Tensor]]:
    """One forward pass per batch of windows; every exit's statistics (and the distillation cache)."""
    layers = num_layers(model)
    device = next(model.parameters()).device
    hidden_size = decoder_stack(model).norm.weight.shape[0]
    accumulators = {k: RidgeAccumulator(hidden_size, device) for k in exits}
    cached: dict[int, list[torch.Tensor]] = {k: [] for k in cached_exits}
    cached_final: list[torch.Tensor] = []
    skip = config.skip_first
    order = list(range(len(windows)))
    batches = [order[i : i + config.batch_windows] for i in range(0, len(order), config.batch_windows)]
    for step, batch in enumerate(batches):
        _report(progress, f"forward pass {step + 1}/{len(batches)} (all exits)", step / len(batches))
        lengths = sorted({windows[i].numel() for i in batch})
        for group in ([i for i in batch if windows[i].numel() == n] for n in lengths):
            ids = torch.stack([windows[i] for i in group]).to(device)
            residual = residual_at_exits(model, ids, [*exits, layers])
            start = min(skip, ids.shape[1] - 1)
            keep = torch.ones(ids.shape, dtype=torch.bool, device=device)
            if masks is not None:
                keep = torch.stack([masks[i] for i in group]).to(device)
            keep[:, :start] = False
            final = residual[layers][keep].float()
            for k in exits:
                accumulators[k].add(residual[k][keep].float(), final)
            if cache_for is not None:
                for row, window in enumerate(group):
                    positions = cache_for.get(window)
                    if positions is None:
                        continue
                    positions = positions.to(device)
                    chosen = positions[keep[row, positions]]
                    cached_final.append(residual[layers][row, chosen].float().cpu())
                    for k in cached_exits:
                        cached[k].append(residual[k][row, chosen].float().cpu())
    return accumulators, cached, cached_final


def _distill(
    model: nn.Module,
    adapters: dict[int, Affine],
    cached: dict[int, torch.Tensor],
    final: torch.Tensor,
    config: FitConfig,
    report: FitReport,
    progress: Progress | None,
    start: float,
    width: float,
) -> dict[int, Affine]:
    """Adam on KL(p_L || p_k) for each adapter, the model frozen; teacher log-probabilities are recomputed
    per step from the cached h_L (the head is too large to cache its outputs)."""
    inner = decoder_stack(model)
    head = model.lm_head
    device = next(model.parameters()).device
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        out: dict[int, Affine] = {}
        exits = sorted(adapters)
        final = final.to(device)
        for position, k in enumerate(exits):
            generator = torch.Generator().manual_seed(config.seed + k)
            weight = adapters[k].weight.to(device).clone().requires_grad_(True)
            bias = adapters[k].bias.to(device).clone().requires_grad_(True)
            optimizer = torch.optim.Adam([weight, bias], lr=config.lr)
            x_all = cached[k].to(device)
            first = last = float("nan")
            for step in range(config.distill_steps):
                frac = (position + step / config.distill_steps) / len(exits)
                _report(
                    progress,
                    f"distilling exit {k} step {step + 1}/{config.distill_steps}",
                    start + width * frac,
                )
                idx = torch.randint(0, x_all.shape[0], (config.distill_batch_tokens,), generator=generator)
                idx = idx.to(device)
                with torch.no_grad():
                    teacher = torch.log_softmax(head(inner.norm(final[idx])).float(), dim=-1)
                student_hidden = torch.nn.functional.linear(x_all[idx], weight, bias)
                student = torch.log_softmax(head(inner.norm(student_hidden)).float(), dim=-1)
                loss = torch.nn.functional.kl_div(student, teacher, log_target=True, reduction="batchmean")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                last = float(loss.detach())
                if step == 0:
                    first = last
            report.distill_kl[k] = (first, last)
            if not (torch.isfinite(weight).all() and torch.isfinite(bias).all()):
                raise FloatingPointError(f"distillation of exit {k} diverged; lower lr")
            out[k] = Affine(weight.detach().cpu(), bias.detach().cpu())
        return out
    finally:
        for p in frozen:
            p.requires_grad_(True)


def fit_exit_adapters(
    model: nn.Module,
    windows: Sequence[torch.Tensor],
    exits: Iterable[int] | None = None,
    config: FitConfig | None = None,
    progress: Progress | None = None,
    masks: Sequence[torch.Tensor] | None = None,
) -> FitResult:
    """Fit an adapter for each exit in `exits` (default: every depth below L) on token `windows` (1-D
    LongTensors, ideally of one length), on the model's device. `masks` (bool, one per window) restrict the
    fit to the positions marked True; every position still serves as context."""
    config = config or FitConfig()
    layers = num_layers(model)
    exits = sorted(set(exits if exits is not None else default_fit_exits(layers)))
    if not exits or exits[0] < 1 or exits[-1] >= layers:
        raise ValueError(f"exits must lie in 1..{layers - 1}, got {exits}")
    if not windows:
        raise ValueError("no fitting windows")
    if masks is not None and [m.shape for m in masks] != [w.shape for w in windows]:
        raise ValueError("masks must have the shapes of the windows")
    hidden_size = decoder_stack(model).norm.weight.shape[0]
    report = FitReport(exits=exits, tokens=0, windows=len(windows))
    distilled = [k for k in exits if config.distill_exits is None or k in config.distill_exits]
    distill = config.distill_steps > 0 and bool(distilled)
    forward_width = 0.6 if distill else 0.9
    cache_for = None
    if distill:
        positions = max(w.numel() for w in windows)
        cache_for = _distill_selection(len(windows), positions, config.distill_tokens, config.seed)

    started = time.perf_counter()
    accumulators, cached, cached_final = _accumulate(
        model,
        windows,
        masks,
        exits,
        distilled,
        config,
        cache_for,
        lambda m, f: _report(progress, m, forward_width * f),
    )
    report.seconds_forward = time.perf_counter() - started
    report.tokens = accumulators[exits[0]].tokens

    started = time.perf_counter()
    maps: dict[int, Affine] = {}
    solve_width = 0.1
    for position, k in enumerate(exits):
        maps[k], report.ridge_mse[k] = accumulators[k].solve(config.ridge)
        report.identity_mse[k] = accumulators[k].identity_mse()
        del accumulators[k]
        _report(
            progress,
            f"solved exit {k} ({position + 1}/{len(exits)})",
            forward_width + solve_width * (position + 1) / len(exits),
        )
    report.seconds_solve = time.perf_counter() - started
    ridge = ExitAdapters(maps, layers, hidden_size)

    if distill:
        started = time.perf_counter()
        stacked = {k: torch.cat(cached.pop(k)) for k in distilled}
        final = torch.cat(cached_final)
        chosen = {k: maps[k] for k in distilled}
        start = forward_width + solve_width
        maps = {**maps, **_distill(model, chosen, stacked, final, config, report, progress, start, 0.3)}
        report.seconds_distill = time.perf_counter() - started
    _report(progress, "exit adapters fitted", 1.0)
    return FitResult(ExitAdapters(maps, layers, hidden_size), ridge, report)
