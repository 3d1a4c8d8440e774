"""Dynamic-depth generation: each request decodes at its own exit depth k with a k-layer KV cache.

For a request at depth k every step computes

    h = Layer_k(... Layer_1(Embed(x_t); KV_1) ...; KV_k),   logits = LMHead(FinalNorm(A_k h + b_k)),

with the shared final norm and LM head, the exit's adapter (A_k, b_k) where the model has one and the request
wants it (identity otherwise, and always at full depth), and a preallocated cache holding exactly the k layers
that ran (`workers.generation.compact`: fused projections, weights in the engine's precision, caches reused
across requests). `model.config` is never touched.

Requests that arrive together at the same depth run as one batch: prompts are left-padded, the 2-D attention
mask hides the padding, and position ids count only real tokens (p_t = sum(mask[:t+1]) - 1), so each row sees
exactly what it would see alone. Rows leave the batch as they finish; padding columns that no remaining row
needs are trimmed. Batches at different depths are stepped round-robin so all of them stream.

On CUDA each one-token decode step is replayed from a CUDA graph captured per (depth, rows, adapter)
(`workers.generation.cuda_graphs`); prefill, and models with sliding-window or MoE layers, run eagerly.
"""

from __future__ import annotations

import gc
import secrets
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal
from uuid import uuid4

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from workers.device import default_device
from workers.early_exit.adapters import ExitAdapters
from workers.early_exit.forward import check_depth, decoder_stack, num_layers
from workers.early_exit.pointer import PointerState, pointer_keys
from workers.generation.compact import CompactLlama, KVCache, LayerSource, Precision
from workers.generation.cuda_graphs import GraphedDecoder
from workers.generation.deltas import RowDeltas, VariantDelta
from workers.generation.sampling import sample_token, seeded_generator
from workers.generation.streamed_load import free_unkept
from workers.generation.streaming import TextStream
from workers.processes import return_freed_memory

FinishReason = Literal["eos", "stop", "length"]


class GenerationRequest(BaseModel):
    """One generation at one exit depth; `temperature == 0` means greedy."""

    model_config = ConfigDict(frozen=True)

    prompt_ids: list[int] = Field(min_length=1)
    depth: int = Field(ge=1)
    max_new_tokens: int = Field(default=64, ge=1)
    temperature: float = Field(default=0.0, ge=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)
    seed: int | None = Field(default=None, ge=0)
    stop: list[str] = Field(default_factory=list)
    ignore_eos: bool = False
    exit_adapter: bool = True  # apply the model's exit adapter at this depth when it has one
    variant: str | None = None  # a variant of the engine's model held as a delta (see `add_variant`)
    request_id: str = Field(default_factory=lambda: uuid4().hex)


@dataclass(frozen=True)
class TokenEvent:
    """A new token of request `index` (its position in the list given to `generate`) and its new text."""

    request_id: str
    index: int
    token_id: int
    delta: str


@dataclass(frozen=True)
class FinishEvent:
    """The end of a request. `delta` is text held back until now (stream it); `text` is the whole output.

    `prefill_ms` is the prefill of the request's batch; `decode_ms` sums the batch's decode steps while the
    request was in it. `token_ids` excludes the EOS token; it includes the token that completed a stop string.
    `speculative` (self-speculative requests only): draft_depth, num_draft_tokens, drafted, accepted,
    acceptance_rate, iterations.
    """

    request_id: str
    index: int
    finish_reason: FinishReason
    delta: str
    text: str
    token_ids: list[int]
    prompt_tokens: int
    depth: int
    seed: int | None
    batch_size: int
    prefill_ms: float
    decode_ms: float
    speculative: dict[str, float] | None = None  # draft statistics of a self-speculative request
    precision: str = "float32"  # of the engine's weights
    exit_adapter: bool = False  # whether the exit's adapter was applied


GenerationEvent = TokenEvent | FinishEvent


def default_eos_ids(model: nn.Module, tokenizer) -> frozenset[int]:
    """EOS ids of the generation config (or model config), plus the tokenizer's EOS token."""
    ids: set[int] = set()
    generation_config = getattr(model, "generation_config", None)
    for source in (getattr(generation_config, "eos_token_id", None), model.config.eos_token_id):
        if source is not None:
            ids.update([source] if isinstance(source, int) else source)
            break
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device):
    """(ids, mask, positions) for left-padded prompts; positions p_t = max(sum(mask[:t+1]) - 1, 0)."""
    width = max(len(prompt) for prompt in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device)


@dataclass
class _Row:
    """One request's progress inside a batch."""

    index: int
    request: GenerationRequest
    seed: int | None
    stream: TextStream
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)
    decode_ms: float = 0.0


class _DepthBatch:
    """Requests at one depth decoded together; `step()` runs prefill first, then one decode step per call."""

    def __init__(self, engine: EarlyExitEngine, rows: list[_Row]) -> None:
        self.engine, self.rows = engine, rows
        self.depth = rows[0].request.depth
        self.batch_size = len(rows)
        # every row shares its exit adapters (`plan`): the base's, or one variant's own
        self.own_adapters = engine.own_adapters(rows[0].request)
        adapters = self.own_adapters or engine.adapters
        self.adapter = rows[0].request.exit_adapter and adapters is not None and adapters.has(self.depth)
        # the exit's pointer (workers/early_exit/pointer.py): one state per row, from the prefill on
        self.pointer = adapters.pointer(self.depth) if self.adapter and adapters is not None else None
        self.pointer_states: list[PointerState] = []
        self.deltas = engine.row_deltas([row.request for row in rows])
        self.cache: KVCache | None = None
        self.mask: torch.Tensor | None = None
        self.padded = False
        self.positions: torch.Tensor | None = None
        self.prefill_ms = 0.0

    @property
    def done(self) -> bool:
        return not self.rows

    def step(self) -> list[GenerationEvent]:
        start = self.engine.clock()
        prefill = self.mask is None
        chosen = self._choose(self._prefill() if prefill else self._decode())
        if self.pointer_states:
            for state, token in zip(self.pointer_states, chosen, strict=True):
                state.observe(token)
        elapsed = self.engine.clock() - start
        if prefill:
            self.prefill_ms = elapsed
        else:
            for row in self.rows:
                row.decode_ms += elapsed
        return self._advance(chosen)

    def _forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = self.mask if self.padded else None
        if self.pointer is not None:
            return self._forward_with_pointer(ids, mask)
        graphs = self.engine.graphs
        plain = self.deltas is None and self.own_adapters is None
        if graphs is not None and ids.shape[1] == 1 and plain:
            return graphs.step(ids, self.positions, self.cache, self.depth, mask, self.adapter)
        return self.engine.compact.forward(
            ids,
            self.positions,
            self.cache,
            self.depth,
            mask,
            self.adapter,
            deltas=self.deltas,
            adapters=self.own_adapters,
        )

    def _forward_with_pointer(self, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Mixed log-probabilities (B, V) of the exit and its pointer at each row's last position; at the
        prefill, first each row's pointer state from its prompt."""
        compact = self.engine.compact
        hidden = compact.hidden_states(ids, self.positions, self.cache, self.depth, mask, self.deltas)

        def logits(h: torch.Tensor) -> torch.Tensor:
            return compact.logits(h, self.depth, True, self.deltas, self.own_adapters)

        keys = pointer_keys(hidden)
        if not self.pointer_states:  # the prefill: the prompt's last tokens are the posterior's evidence
            assert self.pointer is not None
            width = ids.shape[1]
            prompts = [ids[i, width - len(row.request.prompt_ids) :] for i, row in enumerate(self.rows)]
            needed = [
                PointerState.evidence(self.pointer, keys[i, -len(p) :], p) for i, p in enumerate(prompts)
            ]
            # columns (of the padded batch) whose exit probability some row needs: the head runs there alone
            columns = sorted(
                {width - 1 - wanted.numel() + j for wanted in needed for j in wanted.nonzero()[:, 0].tolist()}
            )
            seen_at: dict[int, torch.Tensor] = {}
            for start in range(0, len(columns), 64):  # bounded temporaries: (B, 64, V) logits at a time
                chunk = torch.tensor(columns[start : start + 64], device=ids.device)
                log_probs = torch.log_softmax(logits(hidden[:, chunk]), -1)
                probs = log_probs.gather(-1, ids[:, chunk + 1, None])[..., 0].exp()
                seen_at.update({c: probs[:, n] for n, c in enumerate(columns[start : start + 64])})
            for i, (prompt, wanted) in enumerate(zip(prompts, needed, strict=True)):
                first = width - 1 - wanted.numel()
                seen = torch.ones(wanted.numel(), device=ids.device)
                for j in wanted.nonzero()[:, 0].tolist():
                    seen[j] = seen_at[first + j][i]
                self.pointer_states.append(
                    PointerState.from_prompt(self.pointer, keys[i, -prompt.numel() :], prompt, seen)
                )
        last = logits(hidden[:, -1])
        return torch.stack([state.mix(last[i], keys[i, -1]) for i, state in enumerate(self.pointer_states)])

    @torch.inference_mode()
    def _prefill(self) -> torch.Tensor:
        prompts = [row.request.prompt_ids for row in self.rows]
        ids, self.mask, self.positions = left_pad(prompts, self.engine.pad_id, self.engine.device)
        self.padded = len({len(prompt) for prompt in prompts}) > 1
        longest = max(len(p) + row.request.max_new_tokens for p, row in zip(prompts, self.rows, strict=True))
        self.cache = self.engine.take_cache(self.depth, len(prompts), longest)
        logits = self._forward(ids)
        self.positions = self.positions[:, -1:]
        return logits

    @torch.inference_mode()
    def _decode(self) -> torch.Tensor:
        ids = torch.tensor([[row.tokens[-1]] for row in self.rows], device=self.engine.device)
        self.positions = self.positions + 1
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        return self._forward(ids)

    @torch.inference_mode()
    def _choose(self, logits: torch.Tensor) -> list[int]:
        greedy = logits.argmax(-1).tolist()
        return [
            greedy[i]
            if row.request.temperature == 0
            else sample_token(
                logits[i], row.request.temperature, row.request.top_k, row.request.top_p, row.generator
            )
            for i, row in enumerate(self.rows)
        ]

    def _advance(self, chosen: list[int]) -> list[GenerationEvent]:
        events: list[GenerationEvent] = []
        keep: list[int] = []
        for i, (row, token) in enumerate(zip(self.rows, chosen, strict=True)):
            reason = self._take(row, token, events)
            if reason is None:
                keep.append(i)
            else:
                events.append(self._finish(row, reason))
        if len(keep) < len(self.rows):
            self._shrink(keep)
        return events

    def _take(self, row: _Row, token: int, events: list[GenerationEvent]) -> FinishReason | None:
        request = row.request
        if not request.ignore_eos and token in self.engine.eos_token_ids:
            return "eos"
        row.tokens.append(token)
        delta, stopped = row.stream.push(token)
        events.append(TokenEvent(request.request_id, row.index, token, delta))
        if stopped:
            return "stop"
        return "length" if len(row.tokens) >= request.max_new_tokens else None

    def _finish(self, row: _Row, reason: FinishReason) -> FinishEvent:
        return FinishEvent(
            request_id=row.request.request_id,
            index=row.index,
            finish_reason=reason,
            delta=row.stream.finish(),
            text=row.stream.text,
            token_ids=list(row.tokens),
            prompt_tokens=len(row.request.prompt_ids),
            depth=self.depth,
            seed=row.seed,
            batch_size=self.batch_size,
            prefill_ms=self.prefill_ms,
            decode_ms=row.decode_ms,
            precision=self.engine.precision,
            exit_adapter=self.adapter,
        )

    def drop(self, request_ids: set[str]) -> None:
        """Remove the rows of these requests (abandoned by their clients) without finishing them."""
        keep = [i for i, row in enumerate(self.rows) if row.request.request_id not in request_ids]
        if len(keep) == len(self.rows):
            return
        if self.mask is None:  # not prefilled yet: nothing cached
            self.rows = [self.rows[i] for i in keep]
            self.deltas = self.engine.row_deltas([row.request for row in self.rows])
        else:
            self._shrink(keep)

    @torch.inference_mode()
    def _shrink(self, keep: list[int]) -> None:
        """Drop finished rows, then the leading columns that are padding in every remaining row."""
        self.rows = [self.rows[i] for i in keep]
        self.deltas = self.engine.row_deltas([row.request for row in self.rows])
        self.pointer_states = [self.pointer_states[i] for i in keep] if self.pointer_states else []
        if not keep:
            self.engine.release_cache(self.cache)
            self.cache = None
            return
        index = torch.tensor(keep, device=self.mask.device)
        self.positions, self.mask = self.positions[index], self.mask[index]
        self.cache.keep_rows(keep)
        unused = int((self.mask.sum(0) == 0).long().cumprod(0).sum().item())
        if unused:
            self.cache.drop_leading(unused)
            self.mask = self.mask[:, unused:]
        self.padded = self.padded and not bool(self.mask.all())


class EarlyExitEngine:
    """Holds one LLaMA-layout causal LM (Llama, Mistral, Qwen2) and generates at per-request exit depths.

    Not re-entrant: run one `generate` at a time per engine (the service serialises calls).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        device: str | torch.device | None = None,
        max_batch_size: int = 8,
        eos_token_ids: Iterable[int] | None = None,
        precision: Precision = "float32",
        adapters: ExitAdapters | None = None,
        cuda_graphs: bool = True,
        source: LayerSource | None = None,
    ) -> None:
        self.device = torch.device(device) if device is not None else default_device()
        self.model = model.to(self.device).eval()
        self.precision = precision
        self.adapters = adapters
        self.compact = CompactLlama(self.model, precision, adapters, source)  # source: layers read one by one
        self.source_released = False  # release_source_weights: the source model can no longer run
        use_graphs = cuda_graphs and self.device.type == "cuda" and self.compact.graphable
        self.graphs = GraphedDecoder(self.compact) if use_graphs else None
        self._free_caches: dict[int, KVCache] = {}
        self.tokenizer = tokenizer
        self.num_layers = num_layers(model)
        self.max_batch_size = max_batch_size
        self.eos_token_ids = (
            frozenset(eos_token_ids) if eos_token_ids is not None else default_eos_ids(model, tokenizer)
        )
        self.pad_id = 0
        self.variants: dict[str, VariantDelta] = {}  # variants of this model held as deltas, by name
        self.vocab_size = decoder_stack(model).embed_tokens.num_embeddings
        self.max_positions = getattr(model.config, "max_position_embeddings", None)

    def clock(self) -> float:
        """Milliseconds on a monotonic clock, after waiting for queued GPU work."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() * 1000.0

    def release_source_weights(self) -> int:
        """Free the weights of the source model (`self.model`) that the compact model does not compute
        with: it holds its own quantised or fused copies, so at int8 most of the float32 model is dead
        weight. `self.model` keeps its config and modules but can no longer run (the profiler needs an
        engine that kept it). Returns the bytes freed."""
        freed = free_unkept(self.model, self.compact.tensors())
        self.source_released = True
        gc.collect()
        return_freed_memory()
        return freed

    def set_adapters(self, adapters: ExitAdapters | None) -> None:
        """Serve with these exit adapters from the next batch on (None: none)."""
        self.adapters = adapters
        self.compact.adapters = adapters.to(self.device, self.compact.dtype) if adapters is not None else None
        if self.graphs is not None:
            self.graphs.clear()

    def add_variant(self, variant: VariantDelta) -> VariantDelta:
        """Serve `variant` (a delta over this engine's model, in its device and activation dtype) to requests
        naming it, and return it as held: with quantised weights (int8, int4) its low-rank deltas are held
        as int8 factors too (`VariantDelta.quantized`), at a quarter of float32's bytes, multiplied by the
        same int8 kernel as the base's linears; its own exit adapters, if any, are moved to the device."""
        if variant.adapters is not None:
            variant.adapters = variant.adapters.to(self.device, self.compact.dtype)
        if self.precision in ("int8", "int4"):
            variant = variant.quantized(self.compact.dtype)
        self.variants[variant.name] = variant
        return variant

    def remove_variant(self, name: str) -> None:
        self.variants.pop(name, None)

    def own_adapters(self, request: GenerationRequest) -> ExitAdapters | None:
        """The exit adapters of the request's variant when it has its own (else None: the base's)."""
        return None if request.variant is None else self.variants[request.variant].adapters

    def row_deltas(self, requests: Sequence[GenerationRequest]) -> RowDeltas | None:
        variants = [None if r.variant is None else self.variants[r.variant] for r in requests]
        return RowDeltas.of(variants, self.device)

    def take_cache(self, depth: int, rows: int, positions: int) -> KVCache:
        """A KV cache for `rows` rows of up to `positions` positions at `depth`: the one kept from an earlier
        batch at this depth when it is large enough, else a new one (capacity rounded up to 128)."""
        cache = self._free_caches.pop(depth, None)
        if cache is None or not cache.fits(depth, rows, positions, self.compact.kv_dtype):
            if cache is not None and self.graphs is not None:
                self.graphs.forget(cache)
            cache = self.compact.new_cache(depth, rows, -(-positions // 128) * 128)
        cache.length = 0
        return cache

    def release_cache(self, cache: KVCache | None) -> None:
        """Keep a finished batch's cache for the next batch at its depth (one per depth)."""
        if cache is None:
            return
        replaced = self._free_caches.get(cache.depth)
        if replaced is not None and replaced is not cache and self.graphs is not None:
            self.graphs.forget(replaced)
        self._free_caches[cache.depth] = cache

    def validate(self, request: GenerationRequest) -> None:
        """Raise ValueError for a depth outside 1..L, unknown token ids, or a context beyond the model's."""
        check_depth(self.model, request.depth)
        if request.variant is not None and request.variant not in self.variants:
            raise ValueError(f"variant {request.variant!r} is not loaded in this engine")
        if not all(0 <= token < self.vocab_size for token in request.prompt_ids):
            raise ValueError(f"prompt token ids must lie in [0, {self.vocab_size})")
        total = len(request.prompt_ids) + request.max_new_tokens
        if self.max_positions is not None and total > self.max_positions:
            raise ValueError(f"prompt + max_new_tokens = {total} exceeds the model's {self.max_positions}")

    def plan(self, requests: Sequence[GenerationRequest]) -> list[list[int]]:
        """Indices grouped by (depth, exit adapter on/off, whose exit adapters), sorted by prompt length (less
        padding), in chunks of max_batch_size. Variants of this model without exit adapters of their own share
        batches with each other and with the base."""
        groups: dict[tuple[int, bool, str], list[int]] = {}
        for index, request in enumerate(requests):
            own = self.own_adapters(request)
            adapters = own or self.adapters
            adapted = request.exit_adapter and adapters is not None and adapters.has(request.depth)
            owner = request.variant if own is not None and adapted else ""
            groups.setdefault((request.depth, adapted, owner or ""), []).append(index)
        batches = []
        for key in sorted(groups):
            ordered = sorted(groups[key], key=lambda i: len(requests[i].prompt_ids))
            batches += [
                ordered[i : i + self.max_batch_size] for i in range(0, len(ordered), self.max_batch_size)
            ]
        return batches

    def _row(self, index: int, request: GenerationRequest) -> _Row:
        seed = request.seed
        if request.temperature > 0 and seed is None:
            seed = secrets.randbits(63)
        generator = seeded_generator(seed) if request.temperature > 0 else None
        return _Row(index, request, seed, TextStream(self.tokenizer, request.stop), generator)

    def generate(
        self,
        requests: Sequence[GenerationRequest],
        cancelled: Callable[[], set[str]] | None = None,
    ) -> Iterator[GenerationEvent]:
        """Yield a TokenEvent per token as it is produced and one FinishEvent per request.

        All requests are validated before any work starts. Batches run round-robin, one step each.
        Before each step, the requests whose ids `cancelled()` returns leave their batch without events.
        """
        for events in self.steps(requests, cancelled):
            yield from events

    def steps(
        self,
        requests: Sequence[GenerationRequest],
        cancelled: Callable[[], set[str]] | None = None,
    ) -> Iterator[list[GenerationEvent]]:
        """`generate`'s events grouped by the step that produced them (all rows of one batch), so a caller
        can pass on each step's events at once (the inference worker: one Redis round trip per step)."""
        for request in requests:
            self.validate(request)
        pending = deque(
            _DepthBatch(self, [self._row(i, requests[i]) for i in batch]) for batch in self.plan(requests)
        )
        while pending:
            batch = pending.popleft()
            if cancelled is not None:
                batch.drop(cancelled())
                if batch.done:
                    continue
            yield batch.step()
            if not batch.done:
                pending.append(batch)

    def run(
        self,
        requests: Sequence[GenerationRequest],
        on_event: Callable[[GenerationEvent], None] | None = None,
    ) -> list[FinishEvent]:
        """Generate to completion, calling `on_event` on every event; the FinishEvents in request order."""
        results: list[FinishEvent | None] = [None] * len(requests)
        for event in self.generate(requests):
            if on_event is not None:
                on_event(event)
            if isinstance(event, FinishEvent):
                results[event.index] = event
        return [result for result in results if result is not None]
