"""Running one generation request: validate, pick the depth, queue it for an inference worker, read its
events back. Shared by /v1/generate and the OpenAI-compatible endpoints."""

from __future__ import annotations

import contextlib
import json
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from fastapi import HTTPException
from redis import Redis
from redis.asyncio import Redis as AsyncRedis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from transformers import AutoTokenizer

from service import metrics
from service.fleet import inference_worker_alive, inference_worker_heartbeat, live_inference_workers
from service.generation.depth import plan_depth
from service.generation.schemas import (
    ChatMessage,
    DepthOptions,
    SamplingOptions,
    SpeculativeOptions,
    StrataInfo,
    Usage,
)
from service.profiling import request_profile
from service.settings import Settings
from workers.generation.engine import GenerationRequest
from workers.generation.latency import LatencyProfile, default_latency
from workers.generation.quality import ServedQuality, quality_table
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
from workers.store.model_files import read_config
from workers.store.registry import ModelRecord, Registry

FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}
POLL_S = 1.0  # how often a waiting request checks on its worker
NO_WORKER_GRACE_S = 15.0  # a queued request waits this long for a (restarted) worker before its 503


@lru_cache(maxsize=16)
def load_tokenizer(path: Path, mtime: float):  # mtime: a re-created model gets a fresh tokenizer
    return AutoTokenizer.from_pretrained(path)


@lru_cache(maxsize=64)
def vocab_size(path: Path, mtime: float) -> int | None:
    """The model's vocabulary (rows of its embedding): token ids must stay below it."""
    return read_config(path).get("vocab_size")


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

    # -- inputs -------------------------------------------------------------------------------------
    def record(self, model_id: str) -> ModelRecord:
        record = self.registry.get(model_id)
        if record is None:
            raise HTTPException(404, f"model {model_id!r} is not registered (see GET /v1/models)")
        if record.type == "adapter":
            raise HTTPException(422, f"{model_id!r} is a LoRA adapter of {record.base_model!r}, not a model")
        return record

    def tokenizer(self, model_id: str):
        self.record(model_id)  # 404 before anything is read from disk
        path = self.settings.models_dir / model_id
        try:
            return load_tokenizer(path, (path / "config.json").stat().st_mtime)
        except Exception as e:  # a malformed tokenizer raises anything; the message would show the store
            raise HTTPException(
                422, f"model {model_id!r} has no usable tokenizer ({type(e).__name__})"
            ) from e

    def encode(self, model_id: str, prompt: str | None, messages: list[ChatMessage] | None) -> list[int]:
        """Token ids of the prompt (CPU-bound: routes call it off the event loop)."""
        tokenizer = self.tokenizer(model_id)
        if messages is not None:
            if not tokenizer.chat_template:
                raise HTTPException(422, f"model {model_id!r} has no chat template; send a prompt instead")
            try:
                text = tokenizer.apply_chat_template(
                    [{"role": m.role, "content": m.text()} for m in messages],
                    add_generation_prompt=True,
                    tokenize=False,
                )
            except Exception as e:  # the template is the model's own code (jinja): any error is its fault
                raise HTTPException(
                    422, f"model {model_id!r}: its chat template failed ({type(e).__name__})"
                ) from e
            ids = tokenizer.encode(text, add_special_tokens=False)
        else:
            ids = tokenizer.encode(prompt)
        if not ids:
            raise HTTPException(422, "the prompt is empty after tokenization")
        path = self.settings.models_dir / model_id
        vocab = vocab_size(path, (path / "config.json").stat().st_mtime)
        if vocab is not None and (max(ids) >= vocab or min(ids) < 0):
            raise HTTPException(
                422,
                f"model {model_id!r}: its tokenizer produced token id {max(ids)} but the model has only "
                f"{vocab} embeddings (tokenizer and model do not match)",
            )
        return ids

    # -- the inference fleet ------------------------------------------------------------------------
    def live_workers(self) -> int:
        return len(live_inference_workers(self.redis))

    def queue_wait_ms(self, workers: int) -> float:
        """(batches ahead of this request) x (mean service time of a request)."""
        waiting = self.redis.llen(QUEUE_KEY)
        service_ms = float(self.redis.get(SERVICE_MS_KEY) or 0.0)
        return math.ceil(waiting / (max(workers, 1) * 8)) * service_ms

    def latency(self, record: ModelRecord) -> tuple[LatencyProfile, str]:
        """The model's latency model and where it comes from: "profile" (measured, kept up to date by the
        workers), or "default" (conservative, while the model is profiled in the background; nobody waits).
        A measured model whose online scale has drifted beyond STRATA_REPROFILE_DRIFT is re-profiled."""
        latency = self._known_latency(record)
        if latency is None:
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
    ) -> Prepared:
        arrived = time.monotonic()
        record = self.record(model_id)
        s = self.settings
        if len(prompt_ids) > s.max_prompt_tokens:
            raise HTTPException(
                422, f"prompt has {len(prompt_ids)} tokens; the limit is {s.max_prompt_tokens}"
            )
        if new_tokens > s.max_new_tokens:
            raise HTTPException(422, f"max_new_tokens {new_tokens} exceeds the limit of {s.max_new_tokens}")
        workers = self.live_workers()
        if workers == 0:
            metrics.REJECTED.labels("no_worker").inc()
            raise HTTPException(
                503,
                "no live inference worker: start one with `strata serve` or `strata infer`",
                headers={"Retry-After": "5"},
            )
        if self.redis.llen(QUEUE_KEY) >= s.max_waiting:
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
        latency, source = self.latency(record)
        wait = self.queue_wait_ms(workers)
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
        )
        self.redis.rpush(QUEUE_KEY, job.model_dump_json())
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
            quality=plan.quality,
            latency_model=source,
        )

    def _known_latency(self, record: ModelRecord) -> LatencyProfile | None:
        raw = self.redis.get(latency_key(record.id))
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
        try:
            while True:
                reply = await self.aredis.xread({key: last_id}, count=64, block=int(POLL_S * 1000))
                if is_disconnected is not None and time.monotonic() - last_check >= POLL_S:
                    last_check = time.monotonic()
                    if await is_disconnected():  # the client is gone (or gave up): stop for nobody
                        return
                if not reply:
                    problem = self._watch(worker, last_event, prepared.first_token_at is not None)
                    if problem is not None:
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
                    elif kind == "token":
                        if prepared.first_token_at is None:
                            prepared.first_token_at = now
                            metrics.TIME_TO_FIRST_TOKEN.labels(model).observe(now - prepared.arrived)
                        else:
                            metrics.INTER_TOKEN.labels(model).observe(now - prepared.last_token_at)
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
            if not ended:
                self.cancel(prepared.request_id)
            try:
                self.redis.delete(key)
            except (RedisConnectionError, RedisTimeoutError):
                pass

    def _watch(self, worker: str | None, last_event: float, streaming: bool) -> dict | None:
        """Why waiting longer is pointless (an error event with its HTTP status), or None. The stall clock
        runs between tokens only: before the first one the worker may be loading the model."""
        quiet = time.monotonic() - last_event
        if worker is None:  # still queued
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
            return {"error": "the inference worker died while generating; retry the request", "status": 503}
        return None

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


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"
