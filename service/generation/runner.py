"""Running one generation request: validate, pick the depth, queue it for an inference worker, read its
events back. Shared by /v1/generate and the OpenAI-compatible endpoints."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from fastapi import HTTPException
from redis import Redis
from redis.asyncio import Redis as AsyncRedis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.concurrency import run_in_threadpool
from transformers import AutoTokenizer

from service import metrics
from service.fleet import (
    fresh_heartbeats,
    inference_worker_alive,
    inference_worker_heartbeat,
    live_among,
    live_inference_workers,
)
from service.generation.depth import plan_depth
from service.generation.routing import enqueue, queued_worker, read_fleet, served_base
from service.generation.schemas import (
    ChatMessage,
    DepthOptions,
    SamplingOptions,
    SpeculativeOptions,
    StrataInfo,
    StreamingOptions,
    Usage,
)
from service.profiling import request_profile
from workers import composition
from workers.generation.engine import GenerationRequest
from workers.generation.latency import LatencyProfile, default_latency
from workers.generation.quality import ServedQuality, evaluation_text, quality_table
from workers.inference.protocol import (
    EVENTS_TTL_S,
    QUEUE_KEY,
    SERVICE_MS_KEY,
    InferenceJob,
    Speculation,
    cancel_key,
    events_key,
    latency_key,
)
from workers.jobs.profile import PROFILING_LOCK_PREFIX
from workers.settings import Settings
from workers.store.model_files import read_config
from workers.store.registry import KEY as REGISTRY_KEY
from workers.store.registry import ModelRecord, Registry
from workers.templates.renderer import TemplateFailed, TemplateUnusable, output_limit
from workers.templates.renderer import renderer as template_renderer

FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}
POLL_S = 1.0  # how often a waiting request checks on its worker
_UNREAD = object()  # a Redis value not read yet
MAX_RESUBMITS = 2  # times a request whose worker died is sent again
NO_WORKER_GRACE_S = 15.0  # a queued request waits this long for a (restarted) worker before its 503
INLINE_ENCODE_CHARS = 4096  # a prompt this short is tokenized on the event loop: a thread hop costs more
TOKENIZERS_KEPT = 16
_tokenizers: OrderedDict[tuple[Path, float], Any] = OrderedDict()  # (path, mtime) -> tokenizer, LRU
_tokenizers_lock = threading.Lock()
_background: set[asyncio.Task] = set()  # deletions under way


def load_tokenizer(path: Path, mtime: float):  # mtime: a re-created model gets a fresh tokenizer
    """The tokenizer of the model at `path`, kept for the TOKENIZERS_KEPT most recently used models."""
    key = (path, mtime)
    with _tokenizers_lock:
        if key in _tokenizers:
            _tokenizers.move_to_end(key)
            return _tokenizers[key]
    tokenizer = AutoTokenizer.from_pretrained(path)
    with _tokenizers_lock:
        _tokenizers[key] = tokenizer
        while len(_tokenizers) > TOKENIZERS_KEPT:
            _tokenizers.popitem(last=False)
    return tokenizer


@lru_cache(maxsize=256)
def context_length(config: Path, mtime: float) -> int | None:  # mtime: a re-created model is read afresh
    value = read_config(config.parent).get("max_position_embeddings")
    return value if isinstance(value, int) and value > 0 else None


def tokenizer_loaded(path: Path, mtime: float) -> bool:
    return (path, mtime) in _tokenizers


@lru_cache(maxsize=64)
def vocab_size(path: Path, mtime: float) -> int | None:
    """The model's vocabulary (rows of its embedding): token ids must stay below it."""
    return read_config(path).get("vocab_size")


@dataclass(frozen=True)
class FleetState:
    """What a request needs to know of Redis, read in one round trip with its model's record."""

    record: ModelRecord | None
    workers: int  # live inference workers
    waiting: int  # requests in the shared list (those routed to a worker are counted by `read_fleet`)
    service_ms: float  # mean service time of a request
    latency: bytes | None  # the model's stored live latency model
    profile_pending: bool  # a background profile of the model is queued or running
    worker_ids: tuple[str, ...] = ()  # the live inference workers


@dataclass
class Prepared:
    request_id: str
    record: ModelRecord
    prompt_ids: list[int]
    new_tokens: int
    depth: int
    predicted_ms: float | None
    budget_ms: float | None
    arrived: float  # time.monotonic() at arrival
    quality: ServedQuality | None = None
    latency_model: str | None = None
    queue_ms: float | None = None
    batch_size: int | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    finish: dict = field(default_factory=dict)
    job: InferenceJob | None = None  # as queued (sent again if its worker dies before it is answered)
    base: str | None = None  # the base it is routed by
    queue: str | None = None  # the list it was pushed to
    resubmitted: int = 0

    def info(self) -> StrataInfo:
        elapsed = ((self.last_token_at or time.monotonic()) - self.arrived) * 1000
        return StrataInfo(
            depth=self.depth,
            num_layers=self.record.num_layers or self.depth,
            predicted_ms=self.predicted_ms,
            elapsed_ms=round(elapsed, 3),
            budget_met=None if self.budget_ms is None else elapsed <= self.budget_ms,
            latency_budget_ms=self.budget_ms,
            queue_ms=None if self.queue_ms is None else round(self.queue_ms, 3),
            batch_size=self.batch_size,
            speculative=self.finish.get("speculative"),
            precision=self.finish.get("precision"),
            exit_adapter=self.finish.get("exit_adapter"),
            quality=self.quality.model_dump() if self.quality is not None else None,
            latency_model=self.latency_model,
        )

    def usage(self) -> Usage:
        completion = len(self.finish.get("token_ids", []))
        return Usage(
            prompt_tokens=len(self.prompt_ids),
            completion_tokens=completion,
            total_tokens=len(self.prompt_ids) + completion,
        )

    @property
    def finish_reason(self) -> str:
        return FINISH_REASONS.get(self.finish.get("finish_reason", "length"), "stop")


class Generation:
    def __init__(self, redis: Redis, aredis: AsyncRedis, settings: Settings):
        self.redis = redis
        self.aredis = aredis
        self.settings = settings
        self.registry = Registry(redis)
        self._state: dict[str, FleetState] = {}  # a Generation serves one request: Redis is read once

    def state(self, model_id: str) -> FleetState:
        """The model's record and the inference fleet's state, read (once per request) in one round trip."""
        if model_id not in self._state:
            with self.redis.pipeline(transaction=False) as pipe:
                pipe.hget(REGISTRY_KEY, model_id)
                fresh_heartbeats(pipe)
                pipe.llen(QUEUE_KEY)
                pipe.mget([SERVICE_MS_KEY, latency_key(model_id)])
                pipe.exists(PROFILING_LOCK_PREFIX + model_id)
                raw, beats, waiting, (service_ms, latency), pending = pipe.execute()
            live = live_among(beats)
            self._state[model_id] = FleetState(
                record=ModelRecord.model_validate_json(raw) if raw else None,
                workers=len(live),
                worker_ids=tuple(live),
                waiting=waiting,
                service_ms=float(service_ms or 0.0),
                latency=latency,
                profile_pending=bool(pending),
            )
        return self._state[model_id]

    # -- inputs -------------------------------------------------------------------------------------
    def record(self, model_id: str) -> ModelRecord:
        record = self.state(model_id).record
        if record is None:
            raise HTTPException(404, f"model {model_id!r} is not registered (see GET /v1/models)")
        if record.type == "adapter" and record.delta is None:
            raise HTTPException(
                422,
                f"{model_id!r} is a LoRA adapter not stored for serving; import it with "
                f'POST /v1/models/import and "base": {record.base_model!r}',
            )
        if record.type == "adapter" and not self.registry.exists(record.base_model or ""):
            raise HTTPException(
                422, f"LoRA adapter {model_id!r} cannot be served: its base {record.base_model!r} is gone"
            )
        return record

    def composition(
        self, model: str | None, merge: dict | None
    ) -> tuple[str, list[tuple[str, float]] | composition.Computed | None]:
        """(the model to run, the per-request merge's coefficients, its recipe for TIES/DARE (computed by the
        worker) or None). With `merge`, the model is the variants' common base (a `model` given too must be
        that base); 404/422 for what cannot be served."""
        if merge is None:
            if model is None:
                raise HTTPException(422, "give model (or merge)")
            return model, None
        try:
            recipe = composition.parse(merge)
            refs = {t.model for t in recipe.models} | ({recipe.base_model} if recipe.base_model else set())
            bases: dict[str, str | None] = {}
            for ref in sorted(refs):
                record = self.registry.get(ref)
                if record is None:
                    raise HTTPException(404, f"merge: model {ref!r} is not registered (see GET /v1/models)")
                bases[ref] = record.base_model if record.delta is not None else None
            base, terms = composition.terms(recipe, bases)
        except composition.CompositionError as e:
            raise HTTPException(422, str(e)) from e
        if model is not None and model != base:
            raise HTTPException(
                422, f"model {model!r} is not the merge's base {base!r}: give the base or leave it out"
            )
        return base, terms or None

    def text_dir(self, model_id: str) -> Path:
        """Where the model's tokenizer and config are: a LoRA adapter's are its base's."""
        record = self.record(model_id)
        if record.type == "adapter":
            return self.settings.models_dir / (record.base_model or model_id)
        return self.settings.models_dir / model_id

    def context_length(self, model_id: str) -> int | None:
        """The model's max_position_embeddings (None when its config gives none)."""
        config = self.text_dir(model_id) / "config.json"
        return context_length(config, config.stat().st_mtime)

    def tokenizer(self, model_id: str):
        self.record(model_id)  # 404 before anything is read from disk
        path = self.text_dir(model_id)
        try:
            return load_tokenizer(path, (path / "config.json").stat().st_mtime)
        except Exception as e:  # a malformed tokenizer raises anything; the message would show the store
            raise HTTPException(
                422, f"model {model_id!r} has no usable tokenizer ({type(e).__name__})"
            ) from e

    async def encode_async(
        self, model_id: str, prompt: str | None, messages: list[ChatMessage] | None
    ) -> list[int]:
        """`encode`, on the event loop for a short prompt whose tokenizer is loaded (a hop to a thread and
        back costs more than tokenizing it), else in a thread so the loop stays responsive (always for chat:
        its template renders in the sandbox process, which may take up to its deadline)."""
        self.record(model_id)  # 404 first (read with everything else this request needs of Redis)
        path = self.text_dir(model_id)
        size = len(prompt or "") + sum(len(m.text()) for m in messages or ())
        try:
            loaded = tokenizer_loaded(path, (path / "config.json").stat().st_mtime)
        except OSError:
            loaded = False
        if loaded and messages is None and size <= INLINE_ENCODE_CHARS:
            return self.encode(model_id, prompt, messages)
        return await run_in_threadpool(self.encode, model_id, prompt, messages)

    def encode(self, model_id: str, prompt: str | None, messages: list[ChatMessage] | None) -> list[int]:
        """Token ids of the prompt (CPU-bound: routes call it through `encode_async`)."""
        tokenizer = self.tokenizer(model_id)
        if messages is None:
            text, special = prompt or "", True
        else:
            text, special = self.render_chat(model_id, tokenizer, messages), False  # the template has them
        try:
            ids = tokenizer.encode(text, add_special_tokens=special)
        except Exception as e:  # the model's tokenizer (its vocabulary, normalizer...) failed on this text
            raise HTTPException(
                422, f"model {model_id!r}: its tokenizer cannot encode this text ({type(e).__name__})"
            ) from e
        if not ids:
            raise HTTPException(422, "the prompt is empty after tokenization")
        path = self.text_dir(model_id)
        vocab = vocab_size(path, (path / "config.json").stat().st_mtime)
        if vocab is not None and (max(ids) >= vocab or min(ids) < 0):
            raise HTTPException(
                422,
                f"model {model_id!r}: its tokenizer produced token id {max(ids)} but the model has only "
                f"{vocab} embeddings (tokenizer and model do not match)",
            )
        return ids

    def render_chat(self, model_id: str, tokenizer: Any, messages: list[ChatMessage]) -> str:
        """The conversation through the model's chat template, rendered in the sandbox process with its time
        and size limits (never on this thread). A template past the limits is recorded as unusable on the
        model's record: later requests get their 422 without running it again."""
        record = self.record(model_id)
        if record.chat_template_error:
            raise HTTPException(
                422, f"model {model_id!r}: its chat template is unusable ({record.chat_template_error})"
            )
        if not tokenizer.chat_template:
            raise HTTPException(422, f"model {model_id!r} has no chat template; send a prompt instead")
        try:
            template = tokenizer.get_chat_template()
        except ValueError as e:  # several named templates and no "default"
            raise HTTPException(422, f"model {model_id!r}: {str(e).splitlines()[0][:200]}") from e
        conversation = [{"role": m.role, "content": m.text()} for m in messages]
        try:
            return template_renderer().render(
                template, conversation, tokenizer.special_tokens_map, output_limit(conversation)
            )
        except TemplateFailed as e:  # the template refused these messages (its own raise_exception...)
            raise HTTPException(422, f"model {model_id!r}: its chat template failed ({e})") from e
        except TemplateUnusable as e:
            self.registry.mark_chat_template_unusable(model_id, str(e))
            raise HTTPException(422, f"model {model_id!r}: its chat template is unusable ({e})") from e

    # -- the inference fleet ------------------------------------------------------------------------
    def live_workers(self) -> int:
        return len(live_inference_workers(self.redis))

    def latency(self, record: ModelRecord, state: FleetState | None = None) -> tuple[LatencyProfile, str]:
        """The model's latency model and where it comes from: "profile" (measured, kept up to date by the
        workers), or "default" (conservative, while the model is profiled in the background; nobody waits).
        A measured model whose online scale has drifted beyond STRATA_REPROFILE_DRIFT is re-profiled.
        `state`: what `state()` read already (else Redis is asked)."""
        latency = self._known_latency(record, _UNREAD if state is None else state.latency)
        if latency is None:
            if state is None or not state.profile_pending:
                request_profile(self.redis, self.settings, record.id)
            layers, gflops = record.num_layers or 1, self.settings.default_gflops
            return default_latency(layers, record.num_parameters, gflops), "default"
        drift = self.settings.reprofile_drift
        if not 1 / drift <= latency.scale <= drift:
            request_profile(self.redis, self.settings, record.id, if_unprofiled=False)
        return latency, "profile"

    # -- one request --------------------------------------------------------------------------------
    async def prepare(
        self,
        model_id: str,
        prompt_ids: list[int],
        new_tokens: int,
        sampling: SamplingOptions,
        depth: DepthOptions,
        speculative: SpeculativeOptions | None = None,
        streaming: StreamingOptions | None = None,
        merge: list[tuple[str, float]] | composition.Computed | None = None,
    ) -> Prepared:
        """Check the request, plan its depth and queue it. `streaming`: whether the client reads the tokens
        as they come, and how far apart their chunks may be (if not streamed, the worker writes only a few
        token entries a second)."""
        arrived = time.monotonic()
        record = self.record(model_id)
        s = self.settings
        streaming = streaming or StreamingOptions(stream=True)
        if len(prompt_ids) > s.max_prompt_tokens:
            raise HTTPException(
                422, f"prompt has {len(prompt_ids)} tokens; the limit is {s.max_prompt_tokens}"
            )
        if new_tokens > s.max_new_tokens:
            raise HTTPException(422, f"max_new_tokens {new_tokens} exceeds the limit of {s.max_new_tokens}")
        context = self.context_length(model_id)
        if context is not None and len(prompt_ids) + new_tokens > context:
            raise HTTPException(
                422,
                f"the prompt's {len(prompt_ids)} tokens + max_new_tokens {new_tokens} exceed the model's "
                f"context of {context} tokens",
            )
        state = self.state(model_id)
        workers = state.workers
        if workers == 0:
            metrics.REJECTED.labels("no_worker").inc()
            raise HTTPException(
                503,
                "no live inference worker: start one with `strata serve` or `strata infer`",
                headers={"Retry-After": "5"},
            )
        base = served_base(record)
        fleet = read_fleet(self.redis, list(state.worker_ids))
        waiting = state.waiting + fleet.routed_waiting
        if waiting >= s.max_waiting:
            metrics.REJECTED.labels("queue_full").inc()
            raise HTTPException(
                429,
                f"{s.max_waiting} requests are already waiting (STRATA_MAX_WAITING)",
                headers={"Retry-After": "1"},
            )
        if speculative is not None:
            if sampling.temperature > 0:
                raise HTTPException(422, "speculative decoding is greedy: use temperature 0")
            if speculative.draft_depth >= (record.num_layers or 1):
                raise HTTPException(422, f"draft_depth must be below the model's {record.num_layers} layers")
            # its output is the full model's; the draft exit uses its adapter unless the request says not
            depth = DepthOptions(depth=record.num_layers, exit_adapter=depth.exit_adapter)
        latency, source = self.latency(record, state)
        wait = queue_wait_ms(workers, waiting, state.service_ms)
        quality = quality_table(record.profile)
        plan = plan_depth(depth, record.num_layers or 1, latency, len(prompt_ids), new_tokens, wait, quality)
        request = GenerationRequest(
            prompt_ids=prompt_ids,
            depth=plan.depth,
            max_new_tokens=new_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            seed=sampling.seed,
            stop=sampling.stop_list(),
            exit_adapter=depth.exit_adapter,
        )
        job = InferenceJob(
            model=model_id,
            request=request,
            predicted_ms=plan.predicted_ms,
            speculative=Speculation(**speculative.model_dump()) if speculative else None,
            merge=merge,
            stream=streaming.stream,
            stream_interval_ms=(
                s.stream_interval_ms if streaming.stream_interval_ms is None else streaming.stream_interval_ms
            ),
        )
        queue, how = enqueue(self.redis, fleet, base, job.model_dump_json())
        metrics.ROUTED.labels(how).inc()
        metrics.DEPTH.labels(model_id).observe(plan.depth)
        return Prepared(
            request.request_id,
            record,
            prompt_ids,
            new_tokens,
            plan.depth,
            plan.predicted_ms,
            depth.latency_budget_ms,
            arrived,
            quality=plan.quality
            and plan.quality.model_copy(update={"eval_text": evaluation_text(record.profile)}),
            latency_model=source,
            job=job,
            base=base,
            queue=queue,
        )

    def _known_latency(
        self, record: ModelRecord, stored: bytes | None | object = _UNREAD
    ) -> LatencyProfile | None:
        raw = self.redis.get(latency_key(record.id)) if stored is _UNREAD else stored
        if raw:
            return LatencyProfile.model_validate_json(raw)
        if record.profile:
            return LatencyProfile.model_validate(record.profile["latency"])
        return None

    async def events(
        self, prepared: Prepared, is_disconnected: Callable[[], Awaitable[bool]] | None = None
    ) -> AsyncIterator[tuple[str, dict]]:
        """(kind, data) as the worker emits them: started, token..., then finish (or error).

        Watched while waiting: a request whose worker dies gets a 503 error at once (this host) or within
        WORKER_TTL_S, a request with no live worker to take it a 503 after NO_WORKER_GRACE_S (long enough
        for `strata serve` to restart one), a request with no new token for STRATA_GENERATION_STALL_S
        a 504. Whenever the request ends without its finish (error, client gone), it is cancelled in the
        worker so it is not generated to the end for nobody."""
        key = events_key(prepared.request_id)
        last_id = "0-0"
        model = prepared.record.id
        worker: str | None = None
        last_event = last_check = time.monotonic()
        ended = False
        shown = False  # a token has gone to a streaming client: the request can no longer be sent again
        try:
            while True:
                try:
                    reply = await self.aredis.xread({key: last_id}, count=64, block=int(POLL_S * 1000))
                except (RedisConnectionError, RedisTimeoutError) as e:  # the tokens' only way here is gone
                    error = f"Redis became unavailable during the generation ({type(e).__name__}); retry"
                    yield "error", {"error": error, "status": 503}
                    return
                if is_disconnected is not None and time.monotonic() - last_check >= POLL_S:
                    last_check = time.monotonic()
                    if await is_disconnected():  # the client is gone (or gave up): stop for nobody
                        return
                if not reply:
                    try:
                        problem = self._watch(
                            worker, last_event, prepared.first_token_at is not None, prepared.queue
                        )
                        resubmit = problem is not None and problem.get("resubmit")
                        if resubmit and self._resubmit(prepared, shown):
                            self._delete(key)  # what the dead worker wrote of it
                            key, last_id, worker = events_key(prepared.request_id), "0-0", None
                            last_event = time.monotonic()
                            continue
                    except (RedisConnectionError, RedisTimeoutError) as e:
                        problem = {
                            "error": f"Redis became unavailable ({type(e).__name__}); retry",
                            "status": 503,
                        }
                    if problem is not None:
                        problem.pop("resubmit", None)
                        self.cancel(prepared.request_id)  # before the caller hears of it
                        yield "error", problem
                        return
                    continue
                last_event = time.monotonic()
                for entry_id, fields in reply[0][1]:
                    last_id = entry_id
                    kind = fields[b"type"].decode()
                    data = json.loads(fields[b"data"])
                    now = time.monotonic()
                    if kind == "started":
                        worker = data.get("worker")
                        prepared.queue_ms = data["queue_ms"]
                        prepared.batch_size = data["batch_size"]
                        metrics.QUEUE_TIME.labels(model).observe(data["queue_ms"] / 1000)
                    elif kind == "token":  # `count` tokens (several: merged, see workers.inference.events)
                        shown = shown or bool(prepared.job and prepared.job.stream)
                        if prepared.first_token_at is None:
                            prepared.first_token_at = now
                            metrics.TIME_TO_FIRST_TOKEN.labels(model).observe(now - prepared.arrived)
                        else:
                            count = data.get("count", 1)
                            gap = (now - prepared.last_token_at) / count
                            for _ in range(count):
                                metrics.INTER_TOKEN.labels(model).observe(gap)
                        prepared.last_token_at = now
                    elif kind == "finish":
                        prepared.finish = data
                        prepared.last_token_at = now
                        self._record_outcome(prepared)
                    if kind in ("finish", "error"):
                        ended = True
                    yield kind, data
                    if ended:
                        return
        finally:  # synchronous calls: an async one would be cancelled with the client's task
            if ended:  # the worker is done with it: delete it after the answer is on its way
                self._delete_soon(key)
            else:
                self.cancel(prepared.request_id)
                self._delete(key)

    def _delete(self, key: str) -> None:
        try:
            self.redis.delete(key)
        except (RedisConnectionError, RedisTimeoutError):
            pass

    def _delete_soon(self, key: str) -> None:
        """Delete `key` in a task of its own, off the response's path (a round trip saved per request)."""

        async def delete() -> None:
            try:
                await self.aredis.delete(key)
            except (RedisConnectionError, RedisTimeoutError):
                pass

        try:
            task = asyncio.get_running_loop().create_task(delete())
        except RuntimeError:  # no loop (finalised elsewhere)
            self._delete(key)
            return
        _background.add(task)  # the loop keeps weak references only
        task.add_done_callback(_background.discard)

    def _watch(
        self, worker: str | None, last_event: float, streaming: bool, queue: str | None = None
    ) -> dict | None:
        """Why waiting longer is pointless (an error event with its HTTP status, `resubmit` where sending
        the request again may still answer it), or None. The stall clock runs between tokens only: before
        the first one the worker may be loading the model."""
        quiet = time.monotonic() - last_event
        if worker is None:  # still queued
            routed = queued_worker(queue or QUEUE_KEY)
            if routed is not None and not inference_worker_alive(
                routed, inference_worker_heartbeat(self.redis, routed)
            ):
                error = "the inference worker the request was routed to died; retry the request"
                return {"error": error, "status": 503, "resubmit": True}
            if quiet > NO_WORKER_GRACE_S and self.live_workers() == 0:
                return {"error": "no live inference worker took the request", "status": 503}
            return None
        if streaming and quiet > self.settings.generation_stall_s:  # alive or not: it stopped producing
            return {
                "error": f"no progress from the inference worker in {quiet:.0f} s "
                "(STRATA_GENERATION_STALL_S); the request was cancelled",
                "status": 504,
            }
        if not inference_worker_alive(worker, inference_worker_heartbeat(self.redis, worker)):
            error = "the inference worker died while generating; retry the request"
            return {"error": error, "status": 503, "resubmit": True}
        return None

    def _resubmit(self, prepared: Prepared, shown: bool) -> bool:
        """Send a request whose worker died again, under a new id, to a live worker (routed as before);
        False where it cannot be: a streaming client has had some of its tokens, or it was sent
        MAX_RESUBMITS times. The old id is cancelled and taken out of its list if it is still there."""
        job = prepared.job
        if job is None or shown or prepared.resubmitted >= MAX_RESUBMITS or prepared.base is None:
            return False
        self.cancel(prepared.request_id)
        if prepared.queue is not None:
            self.redis.lrem(prepared.queue, 1, job.model_dump_json())
        request = job.request.model_copy(update={"request_id": uuid.uuid4().hex})
        job = job.model_copy(update={"request": request})
        fleet = read_fleet(self.redis, live_inference_workers(self.redis))
        prepared.queue, _ = enqueue(self.redis, fleet, prepared.base, job.model_dump_json())
        metrics.ROUTED.labels("resubmitted").inc()
        prepared.job, prepared.request_id = job, request.request_id
        prepared.resubmitted += 1
        return True

    def cancel(self, request_id: str) -> None:
        """Tell the workers to drop the request (skipped if still queued, removed from its batch if not)."""
        try:
            self.redis.set(cancel_key(request_id), 1, ex=EVENTS_TTL_S)
        except (RedisConnectionError, RedisTimeoutError):
            pass  # Redis is gone: so is the request

    def _record_outcome(self, prepared: Prepared) -> None:
        info = prepared.info()
        model = prepared.record.id
        metrics.END_TO_END.labels(model).observe(info.elapsed_ms / 1000)
        if info.budget_met is not None:
            metrics.BUDGET.labels(model, "met" if info.budget_met else "missed").inc()

    async def complete(
        self, prepared: Prepared, is_disconnected: Callable[[], Awaitable[bool]] | None = None
    ) -> str:
        """Run to the end; the whole text."""
        async with contextlib.aclosing(self.events(prepared, is_disconnected)) as events:
            async for kind, data in events:
                if kind == "error":
                    status = data.get("status", 500)
                    headers = {"Retry-After": "5"} if status == 503 else None
                    raise HTTPException(status, f"generation failed: {data['error']}", headers=headers)
        return prepared.finish["text"]


def queue_wait_ms(workers: int, waiting: int, service_ms: float) -> float:
    """(batches ahead of a request) x (mean service time of a request)."""
    return math.ceil(waiting / (max(workers, 1) * 8)) * service_ms


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"
