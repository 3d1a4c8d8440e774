"""Fitting exit adapters: a closed-form ridge regression per exit, streamed over the data, then (optionally)
KL distillation from the full model with the base frozen.

Ridge (identity-centred). For exit k < L, with residual streams x = h_k and y = h_L (d-dimensional) over the
fitting tokens, the adapter (A, b) minimises

    sum_t c_t ||y_t - A x_t - b||^2 + lambda ||A - I||_F^2,     lambda = ridge * mean_i (X^T C X)_ii,

c_t the weight of token t's window (1 unless the caller weights windows, e.g. a user's text against the
bundled text it is mixed with; Z^T Z below is then Z^T C Z, and so on).

Writing A = I + D and z = [x, 1], the solution is W = [D^T; b^T] = (Z^T Z + lambda P)^{-1} Z^T (Y - X), with
P = diag(1, ..., 1, 0) (the bias is not shrunk). Only Z^T Z ((d+1) x (d+1)) and Z^T (Y - X) ((d+1) x d) are
accumulated, in float64, so memory is O(d^2) per exit whatever the number of tokens; all exits come from one
forward pass per batch (`residual_at_exits`). A zero lambda with too few tokens falls back to the least-norm
solution.

Scale. The final norm takes away the scale of A x + b, so the map cannot make an exit less sure of itself;
a shallow exit through a regression map is over-confident. Each exit's scale s (an inverse temperature:
logits_k = LMHead(s FinalNorm(A x + b))) minimises

    f(s) = mean_t KL(p_L,t || softmax(s z_t)) = mean_t [logsumexp(s z_t) - s E_{p_L,t}[z_t]] + const,

z_t = LMHead(FinalNorm(A x_t + b)), on `scale_tokens` cached fitting tokens. f is convex in s (f'' =
mean_t Var_{softmax(s z_t)}[z_t] >= 0), so Newton's method from s = 1 finds it in a few steps; it runs after
the ridge solve and again after distillation. The scale changes no argmax (greedy output and top-1 agreement
stay); it changes probabilities, hence perplexity and sampling.

Distillation. Starting from the ridge solution (and its scale), each adapter is refined by Adam on

    KL(p_L || p_k),   p_k = softmax(LMHead(s FinalNorm(A x + b))),   p_L = softmax(LMHead(FinalNorm(h_L))),

averaged over tokens, with the model frozen (only A, b and log s train, log s at a larger learning rate; the
rate warms up linearly over the first 5 % of the steps, then decays to 0 along a cosine). The residual
streams of a seeded subset of the fitting tokens are cached once (`distill_tokens` of them), so each step
costs only the norm and the head; all distilled exits step together on one batch, which shares the teacher.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial

import torch
from torch import nn

from workers.early_exit.adapters import MAX_SCALE, Affine, ExitAdapters
from workers.early_exit.forward import decoder_stack, num_layers, residual_at_exits
from workers.early_exit.pointer import THETAS, copy_hits, fit_pointer, pointer_keys

Progress = Callable[[str, float], None]
SCALE_LR_FACTOR = 40.0  # distillation trains log(scale) at this multiple of the map's learning rate
WARMUP_FRACTION = 0.05  # of the distillation steps, over which the learning rate rises linearly


@dataclass(frozen=True)
class FitConfig:
    ridge: float = 1e-4  # lambda as a fraction of the mean diagonal of X^T X
    distill_steps: int = 0  # Adam steps of KL distillation after the ridge fit, all exits together (0: none)
    lr: float = 1e-3  # peak Adam learning rate of the distillation (warm-up, then cosine decay)
    distill_batch_tokens: int = 256  # tokens per distillation step
    distill_tokens: int = 8192  # fitting tokens whose residual streams are cached for distillation
    batch_windows: int = 4  # token windows per forward pass
    skip_first: int = 1  # positions left out at the start of every window (the attention sink)
    distill_exits: tuple[int, ...] | None = None  # exits distilled (None: every fitted exit)
    fit_scale: bool = True  # fit each exit's scale (inverse temperature) after the map
    scale_tokens: int = 1024  # fitting tokens whose residual streams are cached for the scale fit
    pointer: bool = True  # fit each exit's pointer (workers/early_exit/pointer.py) last
    pointer_tokens: int = 4096  # fitting tokens (whole windows, the first ones) the pointers are fitted on
    seed: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.ridge) and self.ridge >= 0):
            raise ValueError("ridge must be finite and >= 0")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError("lr must be finite and > 0")
        if self.distill_steps < 0 or self.distill_batch_tokens < 1 or self.distill_tokens < 1:
            raise ValueError("distill_steps must be >= 0, distill_batch_tokens and distill_tokens >= 1")
        if self.scale_tokens < 1 or self.pointer_tokens < 1:
            raise ValueError("scale_tokens and pointer_tokens must be >= 1")
        if self.batch_windows < 1 or self.skip_first < 0:
            raise ValueError("batch_windows must be >= 1 and skip_first >= 0")


@dataclass
class FitResult:
    adapters: ExitAdapters  # the final adapters (distilled where distillation ran)
    ridge: ExitAdapters  # the closed-form solution alone (the final adapters, pointers too, undistilled)
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
    seconds_scale: float = 0.0
    scale: dict[int, float] = field(default_factory=dict)  # each exit's fitted scale
    scale_kl: dict[int, tuple[float, float]] = field(default_factory=dict)  # KL at scale 1 and at the fit
    seconds_pointer: float = 0.0
    pointer_nll: dict[int, tuple[float, float]] = field(default_factory=dict)  # without and with the pointer

    def as_dict(self) -> dict:
        return {
            "exits": self.exits,
            "tokens": self.tokens,
            "windows": self.windows,
            "seconds": {
                "forward": round(self.seconds_forward, 2),
                "solve": round(self.seconds_solve, 2),
                "distill": round(self.seconds_distill, 2),
                "scale": round(self.seconds_scale, 2),
                "pointer": round(self.seconds_pointer, 2),
            },
            "ridge_mse": {k: round(v, 6) for k, v in self.ridge_mse.items()},
            "identity_mse": {k: round(v, 6) for k, v in self.identity_mse.items()},
            "distill_kl": {k: [round(a, 5), round(b, 5)] for k, (a, b) in self.distill_kl.items()},
            "scale": {k: round(v, 5) for k, v in self.scale.items()},
            "scale_kl": {k: [round(a, 5), round(b, 5)] for k, (a, b) in self.scale_kl.items()},
            "pointer_nll": {k: [round(a, 5), round(b, 5)] for k, (a, b) in self.pointer_nll.items()},
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

    def add(self, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None = None) -> None:
        """Add token pairs: x, y of shape (n, d), each pair counted `weight` times (shape (n,); default 1)."""
        if x.shape != y.shape or x.ndim != 2 or x.shape[1] != self.hidden_size:
            raise ValueError(
                f"expected two (n, {self.hidden_size}) tensors, got {tuple(x.shape)}, {tuple(y.shape)}"
            )
        if weight is not None and weight.shape != x.shape[:1]:
            raise ValueError(f"expected one weight per token pair, got {tuple(weight.shape)}")
        x64 = x.to(self.gram.device, torch.float64)
        r64 = y.to(self.gram.device, torch.float64) - x64
        z = torch.cat([x64, torch.ones(x64.shape[0], 1, dtype=torch.float64, device=x64.device)], dim=1)
        weighted = z if weight is None else z * weight.to(z.device, torch.float64)[:, None]
        self.gram.addmm_(weighted.T, z)
        self.cross.addmm_(weighted.T, r64)
        self.residual_sq += (weighted[:, -1:] * r64 * r64).sum()  # z's last column is 1: weighted's is c_t
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


def _selection(windows: int, positions: int, budget: int, seed: int) -> dict[int, torch.Tensor]:
    """Which (window, position) pairs are cached: a seeded uniform subset of `budget` of them."""
    total = windows * positions
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(total, generator=generator)[: min(budget, total)].sort().values
    out: dict[int, torch.Tensor] = {}
    for w in chosen.div(positions, rounding_mode="floor").unique().tolist():
        mask = chosen.div(positions, rounding_mode="floor") == w
        out[w] = chosen[mask] % positions
    return out


@dataclass
class StateCache:
    """The residual streams at some exits (and at full depth) of chosen (window, position) pairs, kept on the
    CPU for what follows the ridge fit (distillation, the scale fit)."""

    positions: dict[int, torch.Tensor]  # window index -> positions in it
    exits: Sequence[int]
    states: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    final: list[torch.Tensor] = field(default_factory=list)

    def add(
        self, window: int, row: int, residual: dict[int, torch.Tensor], keep: torch.Tensor, top: int
    ) -> None:
        positions = self.positions.get(window)
        if positions is None or not self.exits:
            return
        positions = positions.to(keep.device)
        positions = positions[positions < keep.shape[1]]  # windows of several lengths: the shorter ones
        chosen = positions[keep[row, positions]]
        self.final.append(residual[top][row, chosen].float().cpu())
        for k in self.exits:
            self.states.setdefault(k, []).append(residual[k][row, chosen].float().cpu())

    def stacked(self) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        """The states per exit and at full depth as (n, d) tensors (the lists are released)."""
        states = {k: torch.cat(self.states.pop(k)) for k in self.exits}
        final = torch.cat(self.final)
        self.final = []
        return states, final


@torch.no_grad()
def _accumulate(
    model: nn.Module,
    windows: Sequence[torch.Tensor],
    masks: Sequence[torch.Tensor] | None,
    exits: Sequence[int],
    config: FitConfig,
    caches: Sequence[StateCache],
    progress: Progress | None,
    weights: Sequence[float] | None = None,
) -> dict[int, RidgeAccumulator]:
    """One forward pass per batch of windows; every exit's statistics (and the caches' residual streams),
    each window's tokens counted `weights[i]` times in the statistics."""
    layers = num_layers(model)
    device = next(model.parameters()).device
    hidden_size = decoder_stack(model).norm.weight.shape[0]
    accumulators = {k: RidgeAccumulator(hidden_size, device) for k in exits}
    wanted = sorted({*exits, *(k for cache in caches for k in cache.exits), layers})
    skip = config.skip_first
    order = list(range(len(windows)))
    batches = [order[i : i + config.batch_windows] for i in range(0, len(order), config.batch_windows)]
    for step, batch in enumerate(batches):
        _report(progress, f"forward pass {step + 1}/{len(batches)} (all exits)", step / len(batches))
        lengths = sorted({windows[i].numel() for i in batch})
        for group in ([i for i in batch if windows[i].numel() == n] for n in lengths):
            ids = torch.stack([windows[i] for i in group]).to(device)
            residual = residual_at_exits(model, ids, wanted)
            start = min(skip, ids.shape[1] - 1)
            keep = torch.ones(ids.shape, dtype=torch.bool, device=device)
            if masks is not None:
                keep = torch.stack([masks[i] for i in group]).to(device)
            keep[:, :start] = False
            final = residual[layers][keep].float()
            counts = None
            if weights is not None:
                rows = torch.tensor([float(weights[i]) for i in group], device=device)
                counts = rows[:, None].expand(ids.shape)[keep]
            for k in exits:
                accumulators[k].add(residual[k][keep].float(), final, counts)
            for cache in caches:
                for row, window in enumerate(group):
                    cache.add(window, row, residual, keep, layers)
    return accumulators


def learning_rate_factor(step: int, steps: int) -> float:
    """The distillation's learning rate at `step` (0-based) of `steps`, as a fraction of `lr`: a linear
    warm-up over the first WARMUP_FRACTION of the steps, then a cosine decay towards 0 (never 0 itself)."""
    warmup = max(1, round(WARMUP_FRACTION * steps))
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(steps - warmup, 1)))


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
    """Adam on KL(p_L || p_k) for every adapter together, the model frozen: each step draws one batch of
    cached tokens, computes the teacher's log-probabilities on it once from the cached h_L (the head's outputs
    are too large to cache) and takes one step for every exit on that batch."""
    inner = decoder_stack(model)
    head = model.lm_head
    device = next(model.parameters()).device
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        exits = sorted(adapters)
        final = final.to(device)
        inputs = {k: cached[k].to(device) for k in exits}
        params: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        optimizers: dict[int, torch.optim.Adam] = {}
        schedules: list[torch.optim.lr_scheduler.LambdaLR] = []
        steps = config.distill_steps
        factor = partial(learning_rate_factor, steps=steps)
        for k in exits:
            weight = adapters[k].weight.to(device).clone().requires_grad_(True)
            bias = adapters[k].bias.to(device).clone().requires_grad_(True)
            log_scale = torch.tensor(math.log(adapters[k].scale), device=device, requires_grad=True)
            groups = [{"params": [weight, bias]}]
            if config.fit_scale:
                groups.append({"params": [log_scale], "lr": config.lr * SCALE_LR_FACTOR})
            params[k] = (weight, bias, log_scale)
            optimizers[k] = torch.optim.Adam(groups, lr=config.lr)
            schedules.append(torch.optim.lr_scheduler.LambdaLR(optimizers[k], factor))
        generator = torch.Generator().manual_seed(config.seed)
        for step in range(steps):
            message = f"distilling {len(exits)} exits: step {step + 1}/{steps}"
            _report(progress, message, start + width * step / steps)
            idx = torch.randint(0, final.shape[0], (config.distill_batch_tokens,), generator=generator)
            idx = idx.to(device)
            with torch.no_grad():
                teacher = torch.log_softmax(head(inner.norm(final[idx])).float(), dim=-1)
            for k in exits:
                weight, bias, log_scale = params[k]
                student_hidden = torch.nn.functional.linear(inputs[k][idx], weight, bias)
                normed = inner.norm(student_hidden) * log_scale.exp()
                student = torch.log_softmax(head(normed).float(), dim=-1)
                loss = torch.nn.functional.kl_div(student, teacher, log_target=True, reduction="batchmean")
                optimizers[k].zero_grad(set_to_none=True)
                loss.backward()
                optimizers[k].step()
                kl = float(loss.detach())
                first = report.distill_kl[k][0] if step else kl
                report.distill_kl[k] = (first, kl)
            for schedule in schedules:
                schedule.step()
        out: dict[int, Affine] = {}
        for k in exits:
            weight, bias, log_scale = (t.detach() for t in params[k])
            if not (torch.isfinite(weight).all() and torch.isfinite(bias).all()):
                raise FloatingPointError(f"distillation of exit {k} diverged; lower lr")
            scale = min(max(math.exp(float(log_scale)), 1 / MAX_SCALE), MAX_SCALE)
            out[k] = Affine(weight.cpu(), bias.cpu(), scale)
        return out
    finally:
        for p in frozen:
            p.requires_grad_(True)


@torch.no_grad()
def fit_scale(
    student: torch.Tensor, teacher_logprobs: torch.Tensor, iterations: int = 50, chunk: int = 128
) -> tuple[float, float, float]:
    """The scale s minimising mean_t KL(p_t || softmax(s z_t)) for student logits z and teacher
    log-probabilities log p, both (n, vocab), by Newton's method (the objective is convex in s), and that KL
    at s = 1 and at s. Temporaries are bounded by `chunk` rows."""
    if student.shape != teacher_logprobs.shape or student.ndim != 2 or student.shape[0] == 0:
        raise ValueError("student logits and teacher log-probabilities must be two equal (n, vocab) tensors")
    rows = [slice(i, i + chunk) for i in range(0, student.shape[0], chunk)]
    # per token: E_p[z] and -H(p), so KL(s) = mean_t [logsumexp(s z_t) - s E_p[z_t] - H(p_t)]
    target = torch.cat([(teacher_logprobs[r].exp() * student[r]).sum(-1) for r in rows]).double()
    negative_entropy = torch.cat([(teacher_logprobs[r].exp() * teacher_logprobs[r]).sum(-1) for r in rows])

    def kl(scale: float) -> float:
        lse = torch.cat([torch.logsumexp(scale * student[r].float(), -1) for r in rows]).double()
        return float((lse - scale * target + negative_entropy.double()).mean())

    scale = 1.0
    for _ in range(iterations):
        gradient = hessian = 0.0
        for r, expected in zip(rows, target.split(chunk), strict=True):
            z = student[r].float()
            q = torch.softmax(scale * z, -1)
            mean = (q * z).sum(-1)
            gradient += float((mean.double() - expected).sum())
            hessian += float((q * (z - mean[:, None]).square()).sum(-1).double().sum())
        if not hessian > 0:
            break
        # a damped Newton step (at most halving or doubling), kept inside the stored bounds
        proposed = min(max(scale - gradient / hessian, scale / 2, 1 / MAX_SCALE), 2 * scale, MAX_SCALE)
        converged = abs(proposed - scale) <= 1e-6 * scale
        scale = proposed
        if converged:
            break
    return scale, kl(1.0), kl(scale)


@torch.no_grad()
def _fit_scales(
    model: nn.Module,
    maps: dict[int, Affine],
    states: dict[int, torch.Tensor],
    final: torch.Tensor,
    report: FitReport,
    progress: Progress | None,
    start: float,
    width: float,
) -> dict[int, Affine]:
    """Each map's scale fitted on the cached tokens (the teacher's log-probabilities computed once)."""
    inner = decoder_stack(model)
    device = next(model.parameters()).device
    teacher = torch.log_softmax(model.lm_head(inner.norm(final.to(device))).float(), dim=-1)
    out: dict[int, Affine] = {}
    for position, k in enumerate(sorted(maps)):
        _report(progress, f"fitting the scale of exit {k}", start + width * position / len(maps))
        affine = maps[k]
        student = model.lm_head(inner.norm(affine(states[k].to(device)))).float()
        scale, before, after = fit_scale(student, teacher)
        del student
        out[k] = replace(affine, scale=scale)
        report.scale[k], report.scale_kl[k] = scale, (before, after)
    return out


def fit_scales(
    model: nn.Module,
    adapters: ExitAdapters,
    windows: Sequence[torch.Tensor],
    masks: Sequence[torch.Tensor] | None = None,
    config: FitConfig | None = None,
) -> ExitAdapters:
    """The adapters with each exit's scale fitted afresh on `config.scale_tokens` tokens of `windows` (for
    maps trained elsewhere, e.g. jointly with Sorted Fine-Tuning); the maps themselves are kept."""
    config = config or FitConfig()
    exits = adapters.depths
    if not exits:
        return adapters
    positions = max(w.numel() for w in windows)
    cache = StateCache(_selection(len(windows), positions, config.scale_tokens, config.seed + 1), exits)
    _accumulate(model, windows, masks, [], config, [cache], None)
    states, final = cache.stacked()
    report = FitReport(exits=exits, tokens=0, windows=len(windows))
    maps = _fit_scales(model, dict(adapters.maps), states, final, report, None, 0.0, 1.0)
    return ExitAdapters(maps, adapters.num_layers, adapters.hidden_size)


def fit_exit_adapters(
    model: nn.Module,
    windows: Sequence[torch.Tensor],
    exits: Iterable[int] | None = None,
    config: FitConfig | None = None,
    progress: Progress | None = None,
    masks: Sequence[torch.Tensor] | None = None,
    weights: Sequence[float] | None = None,
) -> FitResult:
    """Fit an adapter for each exit in `exits` (default: every depth below L) on token `windows` (1-D
    LongTensors, ideally of one length), on the model's device. `masks` (bool, one per window) restrict the
    fit to the positions marked True; every position still serves as context. `weights` (one finite value
    > 0 per window) count each window's tokens that many times in the ridge fit."""
    config = config or FitConfig()
    layers = num_layers(model)
    exits = sorted(set(exits if exits is not None else default_fit_exits(layers)))
    if not exits or exits[0] < 1 or exits[-1] >= layers:
        raise ValueError(f"exits must lie in 1..{layers - 1}, got {exits}")
    if not windows:
        raise ValueError("no fitting windows")
    if masks is not None and [m.shape for m in masks] != [w.shape for w in windows]:
        raise ValueError("masks must have the shapes of the windows")
    if weights is not None and (
        len(weights) != len(windows) or not all(math.isfinite(w) and w > 0 for w in weights)
    ):
        raise ValueError("weights must be one finite value > 0 per window")
    hidden_size = decoder_stack(model).norm.weight.shape[0]
    report = FitReport(exits=exits, tokens=0, windows=len(windows))
    distilled = [k for k in exits if config.distill_exits is None or k in config.distill_exits]
    distill = config.distill_steps > 0 and bool(distilled)
    positions = max(w.numel() for w in windows)
    distill_cache = StateCache(
        _selection(len(windows), positions, config.distill_tokens, config.seed), distilled if distill else []
    )
    scale_cache = StateCache(
        _selection(len(windows), positions, config.scale_tokens, config.seed + 1),
        exits if config.fit_scale else [],
    )
    # progress: forward passes, solves, scales, distillation (and the scales after it), then the pointers
    outer = progress
    before_pointers = 0.85 if config.pointer else 1.0
    progress = None if outer is None else (lambda m, f: outer(m, before_pointers * f))
    widths = {"forward": 0.6 if distill else 0.8, "solve": 0.05, "scale": 0.05 if distill else 0.15}

    started = time.perf_counter()
    accumulators = _accumulate(
        model,
        windows,
        masks,
        exits,
        config,
        [distill_cache, scale_cache],
        lambda m, f: _report(progress, m, widths["forward"] * f),
        weights,
    )
    report.seconds_forward = time.perf_counter() - started
    report.tokens = accumulators[exits[0]].tokens

    started = time.perf_counter()
    maps: dict[int, Affine] = {}
    for position, k in enumerate(exits):
        maps[k], report.ridge_mse[k] = accumulators[k].solve(config.ridge)
        report.identity_mse[k] = accumulators[k].identity_mse()
        del accumulators[k]
        _report(
            progress,
            f"solved exit {k} ({position + 1}/{len(exits)})",
            widths["forward"] + widths["solve"] * (position + 1) / len(exits),
        )
    report.seconds_solve = time.perf_counter() - started
    done = widths["forward"] + widths["solve"]

    if config.fit_scale:
        started = time.perf_counter()
        scale_states, scale_final = scale_cache.stacked()
        maps = _fit_scales(model, maps, scale_states, scale_final, report, progress, done, widths["scale"])
        report.seconds_scale = time.perf_counter() - started
        done += widths["scale"]
    ridge = ExitAdapters(maps, layers, hidden_size)

    if distill:
        started = time.perf_counter()
        stacked, final = distill_cache.stacked()
        chosen = {k: maps[k] for k in distilled}
        tuned = _distill(model, chosen, stacked, final, config, report, progress, done, 1.0 - done - 0.05)
        report.seconds_distill = time.perf_counter() - started
        if config.fit_scale:  # again, for the distilled maps
            started = time.perf_counter()
            tuned = _fit_scales(model, tuned, scale_states, scale_final, report, progress, 0.95, 0.05)
            report.seconds_scale += time.perf_counter() - started
        maps = {**maps, **tuned}
    adapters = ExitAdapters(maps, layers, hidden_size)
    if config.pointer:
        started = time.perf_counter()
        rest = 1.0 - before_pointers
        adapters = fit_pointers(
            model,
            adapters,
            windows,
            config.pointer_tokens,
            report,
            lambda m, f: _report(outer, m, before_pointers + rest * f),
        )
        ridge = ridge if distill else adapters  # undistilled, the closed-form fit is the final one
        report.seconds_pointer = time.perf_counter() - started
    _report(outer, "exit adapters fitted", 1.0)
    return FitResult(adapters, ridge, report)


@torch.no_grad()
def fit_pointers(
    model: nn.Module,
    adapters: ExitAdapters,
    windows: Sequence[torch.Tensor],
    tokens: int,
    report: FitReport | None = None,
    progress: Progress | None = None,
) -> ExitAdapters:
    """The adapters with each exit's pointer fitted (`fit_pointer`) on the first windows holding `tokens`
    predictions, through the exit's adapter as it is."""
    exits = adapters.depths
    if not exits:
        return adapters
    inner = decoder_stack(model)
    device = next(model.parameters()).device
    data: dict[int, list[tuple[torch.Tensor, dict[float, torch.Tensor]]]] = {k: [] for k in exits}
    seen_tokens = 0
    for window in windows:
        if seen_tokens >= tokens:
            break
        if window.numel() < 2:
            continue
        _report(progress, f"fitting the exits' pointers: {seen_tokens}/{tokens} tokens", seen_tokens / tokens)
        ids = window.to(device)[None]
        residual = residual_at_exits(model, ids, exits)
        next_ids = ids[0, 1:]
        for k in exits:
            hidden = residual[k][0, :-1]
            logits = model.lm_head(adapters.head_input(hidden, k, inner.norm)).float()
            seen = (logits.gather(1, next_ids[:, None])[:, 0] - torch.logsumexp(logits, -1)).exp()
            keys = pointer_keys(hidden)
            data[k].append((seen, {theta: copy_hits(keys, next_ids, theta) for theta in THETAS}))
        seen_tokens += next_ids.numel()
    maps = {}
    for k, affine in adapters.maps.items():
        pointer, before, after = fit_pointer(data[k])
        maps[k] = replace(affine, pointer=pointer)
        if report is not None:
            report.pointer_nll[k] = (before, after)
    return ExitAdapters(maps, adapters.num_layers, adapters.hidden_size)
