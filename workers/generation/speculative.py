"""Self-speculative greedy decoding: the exit at depth k drafts, the full model verifies, one KV cache.

One request, one preallocated KV cache for all L layers (`workers.generation.compact`, in the engine's weight
precision). With the next token x_t pending at position t (no layer
has its KV yet), an iteration

  1. drafts: feeds x_t, d_1, ..., d_m one at a time through layers 1..k only (appending their KV to those
     k layers), with d_{i+1} = argmax LMHead(FinalNorm(A_k h_k + b_k)) at each step (the exit's adapter
     where the model has one and the request keeps it; no head for d_m's pass);
  2. verifies: feeds the k-layer hidden states h_k of x_t, d_1..d_m through layers k+1..L in one pass
     (appending their KV to those layers), giving the full model's greedy choices f_1..f_{m+1};
  3. accepts the longest prefix with d_i = f_i (a tokens), commits d_1..d_a and f_{a+1}; every layer's KV
     beyond position t + a (the rejected drafts' entries) is never attended to and is overwritten next.

Layers 1..k compute each position exactly once, and layers k+1..L see exactly the inputs a plain full-depth
decode would give them, so the output equals full-depth greedy decoding (up to floating-point differences
between processing one and m+1 positions per pass). Every iteration commits between 1 and m+1 tokens.
Drafting stops early at an EOS token, and m shrinks near max_new_tokens.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from workers.early_exit.forward import decoder_stack, num_layers
from workers.generation.compact import CompactLlama
from workers.generation.engine import (
    EarlyExitEngine,
    FinishEvent,
    FinishReason,
    GenerationRequest,
    TokenEvent,
    default_eos_ids,
)
from workers.generation.streaming import TextStream


@dataclass(frozen=True)
class SpeculativeResult:
    """Output and statistics of one self-speculative greedy generation.

    `accepted / drafted` is the acceptance rate of drafted tokens; `ms` is the whole call (prefill included),
    split into `prefill_ms`, `draft_ms` and `verify_ms`. `token_ids` excludes EOS, like the engine's.
    """

    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    accepted: int
    drafted: int
    iterations: int
    draft_depth: int
    num_draft_tokens: int
    prompt_tokens: int
    prefill_ms: float
    draft_ms: float
    verify_ms: float
    ms: float
    acceptance_rate: float
    tokens_per_iteration: float


@dataclass
class _Stats:
    accepted: int = 0
    drafted: int = 0
    iterations: int = 0
    prefill_ms: float = 0.0
    draft_ms: float = 0.0
    verify_ms: float = 0.0
    total_ms: float = 0.0

    @property
    def acceptance_rate(self) -> float:
        """accepted / drafted (0 when nothing was drafted)."""
        return self.accepted / self.drafted if self.drafted else 0.0


class _Decoder:
    """One speculative generation; `events()` yields TokenEvents and finally a FinishEvent."""

    def __init__(
        self,
        compact: CompactLlama,
        tokenizer,
        request: GenerationRequest,
        draft_depth: int,
        num_draft_tokens: int,
        eos: Iterable[int],
        index: int = 0,
        engine: EarlyExitEngine | None = None,
    ) -> None:
        self.compact, self.request, self.device, self.index = compact, request, compact.device, index
        # the request's variant of the engine's model (a delta over it), and its own exit adapters if any
        self.deltas = engine.row_deltas([request]) if engine is not None else None
        self.own_adapters = engine.own_adapters(request) if engine is not None else None
        self.layers = compact.num_layers
        if not 1 <= draft_depth < self.layers:
            raise ValueError(f"draft_depth must be between 1 and {self.layers - 1}, got {draft_depth}")
        if num_draft_tokens < 1:
            raise ValueError("num_draft_tokens must be at least 1")
        if request.temperature != 0:
            raise ValueError("speculative decoding is greedy only (temperature 0)")
        self.k, self.m = draft_depth, num_draft_tokens
        self.eos = frozenset(eos)
        capacity = len(request.prompt_ids) + request.max_new_tokens + num_draft_tokens + 1
        self.cache = compact.new_cache(self.layers, 1, capacity)
        self.stream = TextStream(tokenizer, request.stop)
        self.tokens: list[int] = []
        self.stats = _Stats()

    def clock(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() * 1000.0

    def _head(self, hidden: torch.Tensor, depth: int) -> torch.Tensor:
        """Greedy token ids of the exit at `depth` for every position of a (1, q, H) tensor."""
        adapter = self.request.exit_adapter
        return self.compact.logits(hidden, depth, adapter, self.deltas, self.own_adapters)[0].argmax(-1)

    def _layers(self, hidden: torch.Tensor, position: int, start: int, stop: int) -> torch.Tensor:
        """Layers start+1..stop over inputs at positions position.., writing their KV at those columns."""
        positions = torch.arange(position, position + hidden.shape[1], device=self.device)[None]
        return self.compact.run_layers(
            hidden, positions, self.cache, start, stop, position, None, self.deltas
        )

    def _embed(self, token_ids: Sequence[int]) -> torch.Tensor:
        return self.compact.embed(torch.tensor([list(token_ids)], device=self.device), self.deltas)

    def _draft_adapted(self) -> bool:
        adapters = self.own_adapters or self.compact.adapters
        return self.request.exit_adapter and adapters is not None and adapters.has(self.k)

    def _commit(self, new: Sequence[int]) -> tuple[list[TokenEvent], FinishReason | None]:
        """Commit tokens in order, as the engine does: EOS ends (not kept), a stop string or the length cap
        ends after the token's event; tokens after the end are dropped."""
        events: list[TokenEvent] = []
        for token in new:
            if not self.request.ignore_eos and token in self.eos:
                return events, "eos"
            self.tokens.append(token)
            delta, stopped = self.stream.push(token)
            events.append(TokenEvent(self.request.request_id, self.index, token, delta))
            if stopped:
                return events, "stop"
            if len(self.tokens) >= self.request.max_new_tokens:
                return events, "length"
        return events, None

    @torch.inference_mode()
    def _prefill(self) -> int:
        hidden = self._layers(self._embed(self.request.prompt_ids), 0, 0, self.layers)
        return int(self._head(hidden[:, -1:], self.layers)[0])

    @torch.inference_mode()
    def _draft(self, pending: int, position: int, budget: int) -> tuple[list[int], torch.Tensor]:
        """Drafts d_1..d_j (j <= min(m, budget - 1)) and the k-layer hidden states of pending, d_1.."""
        limit = min(self.m, budget - 1)
        drafts: list[int] = []
        states = []
        token = pending
        for i in range(limit + 1):
            hidden = self._layers(self._embed([token]), position + i, 0, self.k)
            states.append(hidden)
            if i == limit:
                break
            token = int(self._head(hidden, self.k)[0])
            drafts.append(token)
            if not self.request.ignore_eos and token in self.eos:
                break
        return drafts, torch.cat(states, dim=1)

    @torch.inference_mode()
    def _verify(self, states: torch.Tensor, position: int) -> list[int]:
        hidden = self._layers(states, position, self.k, self.layers)
        return self._head(hidden, self.layers).tolist()

    def events(self) -> Iterator[TokenEvent | FinishEvent]:
        start = self.clock()
        pending = self._prefill()
        position = len(self.request.prompt_ids)
        now = self.clock()
        self.stats.prefill_ms = now - start
        events, reason = self._commit([pending])
        yield from events
        while reason is None:
            budget = self.request.max_new_tokens - len(self.tokens)
            before = self.clock()
            drafts, states = self._draft(pending, position, budget)
            middle = self.clock()
            full = self._verify(states, position)
            self.stats.draft_ms += middle - before
            self.stats.verify_ms += self.clock() - middle
            accepted = 0
            while accepted < len(drafts) and accepted < len(full) and drafts[accepted] == full[accepted]:
                accepted += 1
            new = drafts[:accepted] + ([full[accepted]] if accepted < len(full) else [])
            position += min(accepted + 1, len(full))
            self.stats.accepted += accepted
            self.stats.drafted += len(drafts)
            self.stats.iterations += 1
            pending = new[-1]
            events, reason = self._commit(new)
            yield from events
        self.stats.total_ms = self.clock() - start
        yield FinishEvent(
            request_id=self.request.request_id,
            index=self.index,
            finish_reason=reason,
            delta=self.stream.finish(),
            text=self.stream.text,
            token_ids=list(self.tokens),
            prompt_tokens=len(self.request.prompt_ids),
            depth=self.layers,
            seed=None,
            batch_size=1,
            prefill_ms=self.stats.prefill_ms,
            decode_ms=self.stats.total_ms - self.stats.prefill_ms,
            precision=self.compact.precision,
            exit_adapter=self._draft_adapted(),
            speculative={
                "draft_depth": self.k,
                "num_draft_tokens": self.m,
                "drafted": self.stats.drafted,
                "accepted": self.stats.accepted,
                "acceptance_rate": self.stats.acceptance_rate,
                "iterations": self.stats.iterations,
            },
        )


def _resolve(engine_or_model, tokenizer, eos):
    """(model, compact model, eos ids, engine or None): an engine brings its own compact model (precision,
    adapters); a bare model gets a float32 one."""
    if isinstance(engine_or_model, EarlyExitEngine):
        engine = engine_or_model
        return engine.model, engine.compact, (engine.eos_token_ids if eos is None else eos), engine
    model = engine_or_model
    return model, CompactLlama(model), (default_eos_ids(model, tokenizer) if eos is None else eos), None


def _validate(model: nn.Module, engine: EarlyExitEngine | None, request: GenerationRequest) -> None:
    if engine is not None:
        engine.validate(request)
        return
    vocab = decoder_stack(model).embed_tokens.num_embeddings
    if not all(0 <= token < vocab for token in request.prompt_ids):
        raise ValueError(f"prompt token ids must lie in [0, {vocab})")
    limit = getattr(model.config, "max_position_embeddings", None)
    total = len(request.prompt_ids) + request.max_new_tokens
    if limit is not None and total > limit:
        raise ValueError(f"prompt + max_new_tokens = {total} exceeds the model's {limit}")


def speculative_events(
    engine: EarlyExitEngine,
    request: GenerationRequest,
    draft_depth: int,
    num_draft_tokens: int,
) -> Iterator[TokenEvent | FinishEvent]:
    """Engine-style events for one greedy request decoded self-speculatively (request.depth is ignored:
    the output is full-depth greedy). The FinishEvent reports depth = L and batch_size = 1."""
    model, compact, eos, engine = _resolve(engine, engine.tokenizer, None)
    _validate(model, engine, request.model_copy(update={"depth": num_layers(model)}))
    decoder = _Decoder(compact, engine.tokenizer, request, draft_depth, num_draft_tokens, eos, engine=engine)
    yield from decoder.events()


def speculative_generate(
    engine_or_model: EarlyExitEngine | nn.Module,
    tokenizer,
    prompt_ids: Sequence[int],
    draft_depth: int,
    num_draft_tokens: int = 4,
    max_new_tokens: int = 64,
    stop: Sequence[str] = (),
    eos: Iterable[int] | None = None,
    ignore_eos: bool = False,
) -> SpeculativeResult:
    """Greedy full-depth generation, drafted by the exit at `draft_depth` and verified by the full model.

    `eos`: token ids that end generation (default: the engine's, or the model's and tokenizer's).
    """
    model, compact, eos_ids, engine = _resolve(engine_or_model, tokenizer, eos)
    layers = num_layers(model)
    request = GenerationRequest(
        prompt_ids=list(prompt_ids),
        depth=layers,
        max_new_tokens=max_new_tokens,
        stop=list(stop),
        ignore_eos=ignore_eos,
    )
    _validate(model, engine, request)
    decoder = _Decoder(compact, tokenizer, request, draft_depth, num_draft_tokens, eos_ids)
    finish = None
    for event in decoder.events():
        if isinstance(event, FinishEvent):
            finish = event
    stats = decoder.stats
    return SpeculativeResult(
        text=finish.text,
        token_ids=finish.token_ids,
        finish_reason=finish.finish_reason,
        accepted=stats.accepted,
        drafted=stats.drafted,
        iterations=stats.iterations,
        draft_depth=draft_depth,
        num_draft_tokens=num_draft_tokens,
        prompt_tokens=len(request.prompt_ids),
        prefill_ms=stats.prefill_ms,
        draft_ms=stats.draft_ms,
        verify_ms=stats.verify_ms,
        ms=stats.total_ms,
        acceptance_rate=stats.acceptance_rate,
        tokens_per_iteration=len(finish.token_ids) / stats.iterations if stats.iterations else 0.0,
    )
