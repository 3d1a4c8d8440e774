"""Measuring a model's exits on this hardware: latency coefficients and quality per depth.

Latency: for each depth k of the grid, the engine prefills random prompts of a few lengths P and decodes N
tokens; medians over repeats give samples that `fit_latency` turns into t(k, P, N) = a_k + b_k P + c_k N.

Quality on a held-out text x_1..x_T, all exits from one pass per window (`hidden_at_exits`):

    perplexity_k = exp(-(1/n) sum_t log p_k(x_{t+1} | x_<=t)),
    agreement_k  = (1/n) sum_t [argmax p_k(. | x_<=t) == argmax p_L(. | x_<=t)],

for every exit k without its adapter (p_k from LMHead(FinalNorm(h_k))) and, when the model has exit adapters,
with it (p_k from LMHead(FinalNorm(A_k h_k + b_k)), mixed with the exit's pointer over the window where it has
one: `workers/early_exit/pointer.py`). Full depth never has an adapter.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

import torch
from pydantic import BaseModel, Field
from torch import nn

from workers.device import describe_device
from workers.early_exit.adapters import ExitAdapters
from workers.early_exit.pointer import pointer_keys, score_targets
from workers.eval.eval_text import EvalText, resolve_eval_text, scoring_window
from workers.generation.compact import CompactLlama
from workers.generation.engine import EarlyExitEngine, GenerationRequest
from workers.generation.latency import DecodeSample, LatencyProfile, PrefillSample, fit_latency
from workers.threads import held_threads

HELDOUT_PATH = Path(__file__).resolve().parent.parent / "data" / "heldout.txt"

Progress = Callable[[str, float], None]


class ExitQuality(BaseModel):
    """Quality of the exit at `depth` over `tokens` next-token predictions: without an exit adapter, and
    with the model's adapter at that exit when it has one (None otherwise)."""

    depth: int = Field(ge=1)
    perplexity: float
    top1_agreement: float = Field(ge=0, le=1)
    tokens: int = Field(ge=1)
    adapter_perplexity: float | None = None
    adapter_top1_agreement: float | None = Field(default=None, ge=0, le=1)

    def served(self, exit_adapter: bool = True) -> tuple[float, float]:
        """(perplexity, top-1 agreement) of the exit as served: with its adapter when it has one and
        `exit_adapter` is on, without otherwise."""
        if exit_adapter and self.adapter_perplexity is not None and self.adapter_top1_agreement is not None:
            return self.adapter_perplexity, self.adapter_top1_agreement
        return self.perplexity, self.top1_agreement


class TextQuality(BaseModel):
    """The quality table of one evaluation text (at the served precision), with the text's size."""

    tokens: int = Field(ge=1, description="Tokens of the text scored (at most max_quality_tokens)")
    source: str = Field(description="bundled, inline or file")
    quality: dict[int, ExitQuality]


class ModelProfile(BaseModel):
    """What the service needs to pick depths for one model on one machine."""

    model_name: str | None = None
    device: str
    dtype: str
    num_layers: int
    grid: list[int]
    latency: LatencyProfile
    quality: dict[int, ExitQuality] = Field(
        description="Per exit, in the precision the model is served in, on the evaluation text `eval_text`"
    )
    eval_text: str = Field(
        default="heldout",  # profiles stored before evaluation texts had names were all on heldout.txt
        description="The designated evaluation text: quality floors read `quality`, measured on it",
    )
    quality_by_text: dict[str, TextQuality] = Field(
        default_factory=dict, description="Quality per evaluation text measured, by the text's name"
    )
    precision: str = Field(default="float32", description="Weight precision of the profiled engine")
    quality_by_precision: dict[str, dict[int, ExitQuality]] = Field(
        default_factory=dict, description="The same table at the served precision and at float32"
    )
    quality_error: str | None = Field(
        default=None, description="Why quality was not measured (the latency was); None when it was"
    )
    created_at: datetime


def default_grid(layers: int, step: int = 2) -> list[int]:
    """Every `step` layers, plus full depth: {step, 2 step, ...} U {L}."""
    return sorted(set(range(step, layers + 1, step)) | {layers})


def _report(progress: Progress | None, message: str, fraction: float) -> None:
    if progress is not None:
        progress(message, fraction)


def _timed_run(
    engine: EarlyExitEngine, depth: int, prompt: list[int], new_tokens: int
) -> tuple[float, float]:
    """(prefill_ms, decode_ms of new_tokens - 1 steps) for one greedy request that ignores EOS."""
    request = GenerationRequest(prompt_ids=prompt, depth=depth, max_new_tokens=new_tokens, ignore_eos=True)
    result = engine.run([request])[0]
    return result.prefill_ms, result.decode_ms


def measure_latency(
    engine: EarlyExitEngine,
    grid: Sequence[int],
    prompt_lengths: Sequence[int] = (16, 64, 256),
    decode_tokens: int = 16,
    repeats: int = 3,
    progress: Progress | None = None,
    seed: int = 0,
) -> LatencyProfile:
    """Fit t(k, P, N) per depth from median prefill and decode times over `repeats` runs."""
    limit = (engine.max_positions or 10**9) - decode_tokens - 1
    lengths = sorted({min(length, limit) for length in prompt_lengths})
    generator = torch.Generator().manual_seed(seed)
    prompts = {p: torch.randint(1, engine.vocab_size, (p,), generator=generator).tolist() for p in lengths}
    _timed_run(engine, max(grid), prompts[lengths[0]], 2)
    prefill, decode = [], []
    for step, depth in enumerate(grid):
        _report(progress, f"latency at depth {depth}", step / len(grid))
        for length in lengths:
            if engine.graphs is not None:  # capture this depth's CUDA graphs outside the timed runs
                _timed_run(engine, depth, prompts[length], decode_tokens + 1)
            runs = [_timed_run(engine, depth, prompts[length], decode_tokens + 1) for _ in range(repeats)]
            prefill.append(
                PrefillSample(depth=depth, prompt_tokens=length, ms=statistics.median(r[0] for r in runs))
            )
            decode.append(
                DecodeSample(depth=depth, new_tokens=decode_tokens, ms=statistics.median(r[1] for r in runs))
            )
    _report(progress, "latency measured", 1.0)
    return fit_latency(engine.num_layers, prefill, decode)


@torch.inference_mode()
def scoring_windows(token_ids: Sequence[int], window: int) -> list[Sequence[int]]:
    """The text cut into windows of `window` tokens overlapping by one, so each of its T - 1 next-token
    predictions is scored once; every window has at least two tokens."""
    return [token_ids[i : i + window] for i in range(0, len(token_ids) - 1, window - 1)]


def target_scores(logits: torch.Tensor, next_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """From logits (T, V): the NLL of each next token (T,) and each position's most probable token (T,)."""
    logits = logits.float()
    return torch.nn.functional.cross_entropy(logits, next_ids, reduction="none"), logits.argmax(-1)


def served_scores(
    compact: CompactLlama, hidden: torch.Tensor, depth: int, next_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`target_scores` of the exit at `depth` through its adapter, as the engine serves it, for one window's
    residual stream `hidden` (T, d) whose next tokens are `next_ids` (T,): with the exit's pointer over the
    window where it has one, read at the next tokens and the argmax only (`score_targets`, which gives what
    the full mixture `score_window` gives)."""
    logits = compact.logits(hidden, depth, True)
    pointer = compact.adapters.pointer(depth) if compact.adapters is not None else None
    if pointer is None:
        return target_scores(logits, next_ids)
    log_probs, top = score_targets(pointer_keys(hidden), logits, next_ids, pointer)
    return -log_probs, top


def measure_quality(
    model: nn.Module | CompactLlama,
    token_ids: Sequence[int],
    grid: Sequence[int],
    window: int = 256,
    progress: Progress | None = None,
    adapters: ExitAdapters | None = None,
) -> dict[int, ExitQuality]:
    """Perplexity and top-1 agreement with full depth for every exit in `grid` (and with each exit's adapter
    where the model has one), in the weight precision of `model`: a transformers model is measured in
    float32 (with `adapters`), an engine's compact model in its own precision with its own adapters.

    The text is cut into windows of `window` tokens overlapping by one, so each of its T - 1 next-token
    predictions is scored once (with the context available inside its window).
    """
    compact = model if isinstance(model, CompactLlama) else CompactLlama(model, "float32", adapters)
    layers = compact.num_layers
    exits = sorted(set(grid) | {layers})
    if len(token_ids) < 2 or window < 2:
        raise ValueError("the held-out text needs at least two tokens and windows of two tokens")
    adapted = [k for k in exits if compact.has_adapter(k) and k < layers]
    chunks = scoring_windows(token_ids, window)
    nll = dict.fromkeys(exits, 0.0)
    agree = dict.fromkeys(exits, 0)
    adapter_nll = dict.fromkeys(adapted, 0.0)
    adapter_agree = dict.fromkeys(adapted, 0)
    count = 0

    def score(nll_top1: tuple[torch.Tensor, torch.Tensor], full_top1: torch.Tensor) -> tuple[float, int]:
        return float(nll_top1[0].double().sum()), int((nll_top1[1] == full_top1).sum().item())

    for step, chunk in enumerate(chunks):
        _report(progress, f"quality window {step + 1}/{len(chunks)}", step / len(chunks))
        ids = torch.tensor([list(chunk)], device=compact.device)
        residual = compact.residuals(ids, exits)
        targets = ids[0, 1:]
        full_top1 = compact.logits(residual[layers][0, :-1], layers).argmax(-1)
        for depth in exits:
            logits = compact.logits(residual[depth][0, :-1], depth, False)
            loss, hits = score(target_scores(logits, targets), full_top1)
            nll[depth] += loss
            agree[depth] += hits
        for depth in adapted:
            loss, hits = score(served_scores(compact, residual[depth][0, :-1], depth, targets), full_top1)
            adapter_nll[depth] += loss
            adapter_agree[depth] += hits
        count += targets.numel()
    _report(progress, "quality measured", 1.0)
    return {
        depth: ExitQuality(
            depth=depth,
            perplexity=math.exp(nll[depth] / count),
            top1_agreement=agree[depth] / count,
            tokens=count,
            adapter_perplexity=math.exp(adapter_nll[depth] / count) if depth in adapter_nll else None,
            adapter_top1_agreement=adapter_agree[depth] / count if depth in adapter_agree else None,
        )
        for depth in exits
        if depth in grid
    }


def profile_model(
    engine: EarlyExitEngine,
    grid: Sequence[int] | None = None,
    eval_texts: Sequence[EvalText] | None = None,
    model_name: str | None = None,
    prompt_lengths: Sequence[int] = (16, 64, 256),
    decode_tokens: int = 16,
    repeats: int = 3,
    max_quality_tokens: int = 2048,
    progress: Progress | None = None,
    adapters: ExitAdapters | None = None,
    latency_threads: int | None = None,
) -> ModelProfile:
    """Latency (first 80% of progress; on `latency_threads` threads, those the model is served with, when
    given) and quality (last 20%) of the engine's model over `grid`, quality on
    each of `eval_texts` (default: the broad held-out); the first is the designated one, whose table
    (`quality`, also at float32 in `quality_by_precision`) quality floors read. A text the model's tokenizer
    cannot make two tokens of (or fails on) costs the quality tables, not the profile: latency is measured
    and `quality_error` says why quality was not (a user's text is checked for a whole window before it is
    queued)."""
    if engine.source_released:
        raise ValueError("profiling needs an engine that kept its source model (release_source_weights)")
    grid = sorted(set(grid or default_grid(engine.num_layers)))
    texts = list(eval_texts or [resolve_eval_text(None, [])])
    window = scoring_window(engine.max_positions)

    def scaled(start: float, width: float) -> Progress:
        return lambda message, fraction: _report(progress, message, start + width * fraction)

    with held_threads(latency_threads):
        latency = measure_latency(engine, grid, prompt_lengths, decode_tokens, repeats, scaled(0.0, 0.8))
    encoded: list[list[int]] = []
    quality_error = None
    for text in texts:
        token_ids, quality_error = _heldout_ids(engine, text.text, max_quality_tokens)
        if quality_error is not None:
            break
        encoded.append(token_ids)
    if quality_error is None and window < 2:
        quality_error = f"quality not measured: the model's context ({window} position) is too short"
    adapters = adapters if adapters is not None else engine.adapters
    served = engine.compact
    if adapters is not engine.adapters:
        served = CompactLlama(engine.model, engine.precision, adapters)
    reference = {}
    quality: dict[int, ExitQuality] = {}
    by_text: dict[str, TextQuality] = {}
    if quality_error is None:
        if engine.precision != "float32":  # what the precision costs, per exit
            reference["float32"] = measure_quality(
                engine.model, encoded[0], grid, window, scaled(0.8, 0.1), adapters
            )
        start, width = (0.9, 0.1) if reference else (0.8, 0.2)
        width /= len(texts)
        for index, (text, ids) in enumerate(zip(texts, encoded, strict=True)):
            table = measure_quality(served, ids, grid, window, scaled(start + index * width, width))
            by_text[text.name] = TextQuality(tokens=len(ids), source=text.source, quality=table)
        quality = by_text[texts[0].name].quality
    else:
        _report(progress, "latency measured; " + quality_error, 1.0)
    return ModelProfile(
        model_name=model_name,
        device=describe_device(engine.device),
        dtype=str(next(engine.model.parameters()).dtype).removeprefix("torch."),
        num_layers=engine.num_layers,
        grid=grid,
        latency=latency,
        quality=quality,
        eval_text=texts[0].name,
        quality_by_text=by_text,
        precision=engine.precision,
        quality_by_precision={engine.precision: quality, **reference} if quality else {},
        quality_error=quality_error,
        created_at=datetime.now(UTC),
    )


def _heldout_ids(engine: EarlyExitEngine, text: str, limit: int) -> tuple[list[int], str | None]:
    """The held-out text's first `limit` token ids, and why quality cannot be measured on them (or None)."""
    try:
        token_ids = list(engine.tokenizer.encode(text))[:limit]
    except Exception as e:  # noqa: BLE001 - a broken tokenizer costs the quality table, not the profile
        reason = (str(e).splitlines() or [""])[0][:200]
        return [], (
            f"quality not measured: the tokenizer failed on the held-out text ({type(e).__name__}: {reason})"
        )
    if len(token_ids) < 2:
        return token_ids, (
            f"quality not measured: the model's tokenizer makes {len(token_ids)} token(s) of the held-out "
            "text, and at least 2 are needed"
        )
    return token_ids, None
