"""A long-lived inference worker: keeps models loaded, takes generation requests from Redis in batches,
and streams tokens back as they are produced."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from transformers import AutoModelForCausalLM, AutoTokenizer

from workers.composition import Computed
from workers.composition import name as composition_name
from workers.composition_merge import computed_variant
from workers.device import default_device
from workers.early_exit.adapters import FILENAME as ADAPTERS_FILE
from workers.early_exit.adapters import load_adapters
from workers.generation.compact import PRECISIONS, Precision
from workers.generation.deltas import compose
from workers.generation.engine import EarlyExitEngine, FinishEvent, GenerationEvent, TokenEvent
from workers.generation.latency import LatencyProfile
from workers.generation.lowrank_kernel import lowrank_kernel
from workers.generation.speculative import speculative_events
from workers.generation.streamed_load import streamed_model
from workers.inference.activity import clear_serving, mark_serving
from workers.inference.events import PROGRESS_S, EventWriter
from workers.inference.protocol import (
    HEARTBEAT_S,
    QUEUE_KEY,
    SERVICE_MS_KEY,
    WORKER_TTL_S,
    WORKERS_KEY,
    InferenceJob,
    cancel_key,
    capacity_key,
    latency_key,
    resident_key,
    worker_queue_key,
)
from workers.store.delta_only import full_model_dir
from workers.store.file_manifest import ModelFilesChangedError, verify_files
from workers.store.model_store import verify_model
from workers.store.registry import Registry
from workers.variants_delta import delta_base, load_variant

log = logging.getLogger("strata.infer")


def adapters_stamp(path: Path) -> tuple[int, int] | None:
    """(mtime_ns, size) of a model directory's exit-adapter file, None without one."""
    try:
        stat = (path / ADAPTERS_FILE).stat()
    except FileNotFoundError:
        return None
    return stat.st_mtime_ns, stat.st_size


def resolve_precision(precision: str, device: torch.device) -> Precision:
    """`auto`: int8 weights on the CPU (bandwidth-bound decoding), bfloat16 on CUDA."""
    if precision == "auto":
        return "bfloat16" if device.type == "cuda" else "int8"
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be auto or one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision  # type: ignore[return-value]


def load_engine(
    path: Path,
    device: torch.device | None = None,
    max_batch_size: int = 8,
    precision: str = "auto",
    serve_only: bool = False,
) -> EarlyExitEngine:
    """The model at `path` in an engine of the given weight precision, with its exit adapters if it has any.

    Weights are read as stored (float32 on the CPU, bfloat16 on CUDA) and quantised at load. `serve_only`:
    the source model's weights the engine does not compute with are freed (it can serve, not be profiled):
    its decoder layers are read one at a time and let go once copied (workers.generation.streamed_load),
    or, for a checkpoint that cannot be streamed, read whole into memory (not mapped from the file, so
    that what is freed leaves the resident set) and freed once the engine is built."""
    verify_model(path)
    device = device or default_device()
    chosen = resolve_precision(precision, device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    streamed = streamed_model(path, dtype) if serve_only else None  # one float layer at a time
    if streamed is not None:
        model, source = streamed
    else:
        model, source = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, disable_mmap=serve_only), None
    tokenizer = AutoTokenizer.from_pretrained(path)
    adapters = load_adapters(path, model.config.num_hidden_layers, model.config.hidden_size)
    engine = EarlyExitEngine(
        model,
        tokenizer,
        device=device,
        max_batch_size=max_batch_size,
        precision=chosen,
        adapters=adapters,
        source=source,
    )
    if source is not None:
        source.close()
    if serve_only:
        freed = engine.release_source_weights()
        how = "its layers read one at a time" if source is not None else "read whole"
        log.info("%s: loaded (%s), %.1f MB of source weights freed after", path.name, how, freed / 2**20)
    return engine


CANCEL_CHECK_S = 0.2
# Up to ARGV[1] requests from the lists KEYS in order (this worker's own first, then the shared one).
TAKE_MORE = """
local out = {}
for _, key in ipairs(KEYS) do
  local need = tonumber(ARGV[1]) - #out
  if need <= 0 then break end
  local got = redis.call('LPOP', key, need)
  if got then for _, item in ipairs(got) do out[#out + 1] = item end end
end
return out
"""


def _unless_cancelled(events: Iterator, request_id: str, cancelled: Callable[[], set[str]]) -> Iterator:
    """A one-request event stream that stops as soon as the request is cancelled."""
    for event in events:
        if request_id in cancelled():
            return
        yield event


def one_line(error: BaseException, models_dir: Path, limit: int = 300) -> str:
    """An exception as one short line for the client: its type and the first line of its message (those
    of transformers and torch run to many lines), without the store's path."""
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    text = text.replace(f"{models_dir}/", "").replace(str(models_dir), "the store")
    return text if len(text) <= limit else text[: limit - 3] + "..."


class InferenceWorker:
    def __init__(
        self,
        redis: Redis,
        models_dir: Path,
        max_batch_size: int = 8,
        max_models: int = 2,
        precision: str = "auto",
        variant_memory_bytes: int = 2 << 30,
        max_computed: int = 2,
    ):
        self.redis = redis
        self.precision = precision
        self.models_dir = models_dir
        self.max_batch_size = max_batch_size
        self.max_models = max_models  # bases (and plain models) kept loaded
        self.variant_memory_bytes = variant_memory_bytes  # deltas of variants kept loaded, all bases together
        self.variant_lru: OrderedDict[str, tuple[str, int]] = OrderedDict()  # variant -> (its base, bytes)
        self.compositions: dict[str, tuple[str, set[str]]] = {}  # per-request merges: key -> (base, variants)
        # per-request TIES/DARE merges (dense deltas, a model's size each): at most this many, by recipe
        self.max_computed = max_computed
        self.computed_lru: OrderedDict[str, str] = OrderedDict()  # recipe key -> its base
        self.id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.queue = worker_queue_key(self.id)  # the requests the API routes here (taken before QUEUE_KEY's)
        self.loads: Counter[str] = Counter()  # times each base was loaded: reported, so thrash is visible
        self.engines: OrderedDict[str, EarlyExitEngine] = OrderedDict()
        self.adapter_stamps: dict[str, tuple[int, int] | None] = {}
        self.stopping = threading.Event()
        self._busy = 0  # batches being generated and kernels being built (`workers.inference.activity`)
        self._busy_lock = threading.Lock()

    def engine(self, model_id: str) -> EarlyExitEngine:
        """The model's engine, loaded on first use; the least recently used is dropped beyond max_models.
        Exit adapters written after the model was loaded (a `fit_exits` job) are picked up here."""
        if model_id in self.engines:
            self.engines.move_to_end(model_id)
            engine = self.engines[model_id]
            stamp = adapters_stamp(self.models_dir / model_id)
            if stamp != self.adapter_stamps.get(model_id):
                path, config = self.models_dir / model_id, engine.model.config
                engine.set_adapters(load_adapters(path, config.num_hidden_layers, config.hidden_size))
                self.adapter_stamps[model_id] = stamp
            return engine
        log.info("loading %s", model_id)
        record = Registry(self.redis).get(model_id)
        verify_files(model_id, self.models_dir / model_id, record.files if record is not None else None)
        self.adapter_stamps[model_id] = adapters_stamp(self.models_dir / model_id)
        # a variant stored as its delta alone is served over its base (route); loaded as a model of its own
        # (another model's base), it is materialised first
        path = full_model_dir(self.models_dir, model_id)
        engine = load_engine(
            path, max_batch_size=self.max_batch_size, precision=self.precision, serve_only=True
        )
        self.engines[model_id] = engine
        self.loads[model_id] += 1
        while len(self.engines) > self.max_models:
            dropped, _ = self.engines.popitem(last=False)
            for variant in [v for v, (base, _) in self.variant_lru.items() if base == dropped]:
                del self.variant_lru[variant]
            for key in [k for k, (base, _) in self.compositions.items() if base == dropped]:
                del self.compositions[key]
        try:
            self._publish()  # the API routes this base here from now on, without waiting for a heartbeat
        except RedisError as e:
            log.warning("residency not published: %s", e)
        return engine

    def route(self, model_id: str) -> tuple[str, str | None]:
        """(engine to serve `model_id` with, variant name or None): a model stored as a delta of a base
        that is in the store is served as that base plus its delta; anything else as itself."""
        try:
            base = delta_base(self.models_dir / model_id)
        except (OSError, ValueError):
            base = None
        if base is None or base == model_id or not (self.models_dir / base / "config.json").is_file():
            return model_id, None
        return base, model_id

    def hold_variant(self, base: str, variant: str, pinned: set[str]) -> None:
        """Load `variant`'s delta into its base's engine unless it is there; beyond the memory budget the
        least recently used variants not in `pinned` (the group being served) are dropped."""
        engine = self.engine(base)
        if variant in engine.variants and variant in self.variant_lru:
            self.variant_lru.move_to_end(variant)
            return
        path = self.models_dir / variant
        config = engine.model.config
        own = load_adapters(path, config.num_hidden_layers, config.hidden_size)
        held = engine.add_variant(load_variant(path, variant, engine.compact, own))
        self.variant_lru[variant] = (base, held.bytes)
        while sum(size for _, size in self.variant_lru.values()) > self.variant_memory_bytes:
            victim = next((v for v in self.variant_lru if v not in pinned), None)
            if victim is None:
                break
            victim_base, _ = self.variant_lru.pop(victim)
            if victim_base in self.engines:
                self.engines[victim_base].remove_variant(victim)
                for key, (_, members) in list(self.compositions.items()):
                    if victim in members and key not in pinned:  # it holds the victim's tensors
                        self.engines[victim_base].remove_variant(key)
                        del self.compositions[key]

    def hold_composition(
        self, base: str, composition: list[tuple[str, float]] | Computed, pinned: set[str]
    ) -> str:
        """The name of base + sum_i c_i D_i in the base's engine, composed from the variants' deltas once
        and kept (by its recipe) until one of them is dropped; a TIES/DARE merge: `hold_computed`."""
        if isinstance(composition, Computed):
            return self.hold_computed(base, composition, pinned)
        key = composition_name(base, composition)
        engine = self.engine(base)
        if key not in engine.variants:
            for variant, _ in composition:
                if self.route(variant) != (base, variant):
                    raise ValueError(f"{variant!r} is not stored as a delta of {base!r}")
                self.hold_variant(base, variant, pinned | {key})
            parts = [(engine.variants[variant], c) for variant, c in composition]
            engine.add_variant(compose(key, engine.compact, parts))
            self.compositions[key] = (base, {variant for variant, _ in composition})
        return key

    def hold_computed(self, base: str, recipe: Computed, pinned: set[str]) -> str:
        """The name of base + (merged - base) for a TIES/DARE recipe (workers.composition_merge), computed
        from the models' files once and kept by the recipe's hash; beyond `max_computed` the least recently
        used (not in `pinned`) is dropped."""
        key = recipe.key()
        engine = self.engine(base)
        if key in engine.variants and key in self.computed_lru:
            self.computed_lru.move_to_end(key)
            return key
        dirs = {}
        for variant in recipe.variants:
            if self.route(variant) != (base, variant):
                raise ValueError(f"{variant!r} is not stored as a delta of {base!r}")
            dirs[variant] = self.models_dir / variant
        engine.add_variant(computed_variant(recipe, self.models_dir / base, dirs, engine.compact, key))
        self.computed_lru[key] = base
        while len(self.computed_lru) > self.max_computed:
            victim = next((k for k in self.computed_lru if k not in pinned and k != key), None)
            if victim is None:
                break
            victim_base = self.computed_lru.pop(victim)
            if victim_base in self.engines:
                self.engines[victim_base].remove_variant(victim)
        return key

    def resident(self) -> dict[str, dict]:
        """The loaded bases (and plain models) with the variants held over each, their delta bytes, and how
        many times this worker has loaded the base (more than once: it was dropped and needed again)."""
        out = {
            model: {"variants": [], "variant_bytes": 0, "loads": self.loads[model]}
            for model in list(self.engines)
        }
        for variant, (base, size) in list(self.variant_lru.items()):  # read by the heartbeat thread too
            if base in out:
                out[base]["variants"].append(variant)
                out[base]["variant_bytes"] += size
        return out

    def _publish(self) -> None:
        """Write this worker's heartbeat and residency (the API routes requests by them), and renew its
        busy mark while it generates."""
        with self._busy_lock:  # never renewed after the batch's end has cleared it
            if self._busy:
                mark_serving(self.redis, self.id)
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.zadd(WORKERS_KEY, {self.id: time.time()})
            pipe.set(resident_key(self.id), json.dumps(self.resident()), ex=int(WORKER_TTL_S))
            pipe.set(capacity_key(self.id), self.max_models, ex=int(WORKER_TTL_S))
            pipe.execute()

    def _heartbeat(self) -> None:
        while not self.stopping.is_set():
            try:
                self._publish()
            except Exception as e:  # keep beating through a Redis outage
                log.warning("heartbeat failed: %s", e)
            self.stopping.wait(HEARTBEAT_S)

    def _take_batch(self) -> list[InferenceJob]:
        """Up to max_batch_size waiting requests, those routed to this worker first, then shared ones,
        less those the API has given up on meanwhile."""
        item = self.redis.blpop([self.queue, QUEUE_KEY], timeout=1)
        if item is None:
            return []
        first = InferenceJob.model_validate_json(item[1])
        with self.redis.pipeline(transaction=False) as pipe:  # one round trip for a request alone
            pipe.eval(TAKE_MORE, 2, self.queue, QUEUE_KEY, self.max_batch_size - 1)
            pipe.exists(cancel_key(first.request.request_id))
            more, first_gone = pipe.execute()
        jobs = [first, *(InferenceJob.model_validate_json(r) for r in more or [])]
        gone = self._cancelled_among([job.request.request_id for job in jobs[1:]])
        if first_gone:
            gone.add(first.request.request_id)
        for request_id in gone:
            log.info("skipping request %s: cancelled while queued", request_id)
        return [job for job in jobs if job.request.request_id not in gone]

    def _cancelled_among(self, request_ids: list[str]) -> set[str]:
        if not request_ids:
            return set()
        with self.redis.pipeline(transaction=False) as pipe:
            for request_id in request_ids:
                pipe.exists(cancel_key(request_id))
            flags = pipe.execute()
        return {request_id for request_id, flag in zip(request_ids, flags, strict=True) if flag}

    def _cancel_watch(self, request_ids: list[str], writer: EventWriter):
        """A `cancelled()` for the engine: the abandoned ones among `request_ids`, asked of Redis at most
        every CANCEL_CHECK_S (once a step would cost a round trip per token)."""
        state = {"at": time.monotonic(), "gone": set()}  # `_take_batch` has just asked

        def cancelled() -> set[str]:
            now = time.monotonic()
            if now - state["at"] >= CANCEL_CHECK_S:
                state["at"] = now
                gone = self._cancelled_among(request_ids)
                for request_id in gone - state["gone"]:
                    log.info("dropping request %s: its client is gone", request_id)
                    writer.drop(request_id)  # nobody reads what was emitted meanwhile
                state["gone"] = gone
            return state["gone"]

        return cancelled

    def _observe(self, model_id: str, finish: FinishEvent, started: float) -> None:
        """Fold what this request took into the model's live latency model and the mean service time
        (two round trips: both reads, then both writes)."""
        elapsed_ms = (time.time() - started) * 1000
        raw, previous = self.redis.mget([latency_key(model_id), SERVICE_MS_KEY])
        with self.redis.pipeline(transaction=False) as pipe:
            if raw:
                profile = LatencyProfile.model_validate_json(raw)
                tokens = len(finish.token_ids)
                updated = profile.observe(finish.depth, finish.prompt_tokens, tokens, elapsed_ms)
                pipe.set(latency_key(model_id), updated.model_dump_json())
            pipe.set(SERVICE_MS_KEY, 0.8 * float(previous or elapsed_ms) + 0.2 * elapsed_ms)
            pipe.execute()

    def serve_group(self, model_id: str, jobs: list[InferenceJob]) -> None:
        """Generate a group's requests, sending each engine step's events at once without waiting for
        Redis to answer (`EventWriter`: the replies are read with the next step's), streamed tokens in chunks
        at most `stream_interval_ms` apart (plus a step)."""
        started = time.time()
        intervals = {
            job.request.request_id: (job.stream_interval_ms / 1000 if job.stream else PROGRESS_S)
            for job in jobs
        }
        writer = EventWriter(self.redis, intervals)
        try:
            self._serve(model_id, jobs, writer, started)
        finally:
            writer.close()

    def _serve(self, model_id: str, jobs: list[InferenceJob], writer: EventWriter, started: float) -> None:
        for job in jobs:
            writer.add(
                job.request.request_id,
                "started",
                {"queue_ms": (started - job.enqueued_at) * 1000, "batch_size": len(jobs), "worker": self.id},
            )
        writer.flush()
        try:
            engine = self.engine(model_id)
        except Exception as e:  # the request's fault only in naming this model: 424, not 500
            log.exception("cannot load %s", model_id)
            reason = f"model {model_id!r} cannot be loaded ({one_line(e, self.models_dir)})"
            self._fail(jobs, writer, reason, 424)
            return
        try:
            jobs = self._variant_requests(model_id, jobs)
            models = {job.request.request_id: job.model for job in jobs}
            cancelled = self._cancel_watch([job.request.request_id for job in jobs], writer)
            plain = [job for job in jobs if job.speculative is None]
            steps = [engine.steps([job.request for job in plain], cancelled)] if plain else []
            for job in jobs:
                if job.speculative is not None:  # its events one by one: it makes several tokens a step
                    spec = job.speculative
                    events = speculative_events(engine, job.request, spec.draft_depth, spec.num_draft_tokens)
                    events = _unless_cancelled(events, job.request.request_id, cancelled)
                    steps.append([event] for event in events)
            for step in (step for stream in steps for step in stream):
                finished = self._queue_step(writer, step)
                writer.flush()
                for event in finished:
                    self._observe(models.get(event.request_id, model_id), event, started)
            writer.sync()  # an error reply to the last step's writes is this group's error too
            # A request may have finished just as its client gave up: the API may have deleted its stream
            # before the finish was written. Its cancel is checked once more, after the finish is in Redis:
            # either the cancel is seen here and the stream deleted, or it was set later and the API's own
            # delete, which follows its cancel, removes the finish.
            for request_id in self._cancelled_among([job.request.request_id for job in jobs]):
                writer.drop(request_id)
        except Exception as e:
            log.exception("generation failed for %s", model_id)
            status = 424 if isinstance(e, ModelFilesChangedError) else 500
            self._fail(jobs, writer, one_line(e, self.models_dir), status)

    @staticmethod
    def _fail(jobs: list[InferenceJob], writer: EventWriter, reason: str, status: int) -> None:
        for job in jobs:
            writer.add(job.request.request_id, "error", {"error": reason, "status": status})
        writer.flush()

    def _variant_requests(self, engine_id: str, jobs: list[InferenceJob]) -> list[InferenceJob]:
        """The group's jobs with each variant's delta loaded and its requests naming it."""
        pinned = {job.model for job in jobs}
        for job in jobs:
            if isinstance(job.merge, Computed):
                pinned |= {job.merge.key(), *job.merge.variants}
            elif job.merge:
                pinned |= {v for v, _ in job.merge}
        out = []
        for job in jobs:
            if job.merge:
                variant = self.hold_composition(engine_id, job.merge, pinned)
                out.append(
                    job.model_copy(update={"request": job.request.model_copy(update={"variant": variant})})
                )
                continue
            _, variant = self.route(job.model)
            if variant is None or job.model == engine_id:
                out.append(job)
                continue
            self.hold_variant(engine_id, variant, pinned)
            out.append(
                job.model_copy(update={"request": job.request.model_copy(update={"variant": variant})})
            )
        return out

    @staticmethod
    def _queue_step(writer: EventWriter, step: list[GenerationEvent]) -> list[FinishEvent]:
        """Queue one engine step's events; the requests it finished."""
        finished = []
        for event in step:
            if isinstance(event, TokenEvent):
                writer.token(event.request_id, event.token_id, event.delta)
            elif isinstance(event, FinishEvent):
                writer.add(event.request_id, "finish", {k: v for k, v in vars(event).items() if k != "index"})
                finished.append(event)
        return finished

    def serve_batch(self, jobs: list[InferenceJob]) -> None:
        """Serve jobs taken together, one group per engine: variants of one base decode in one batch. While
        it runs, the worker is marked as generating (job workers leave its cores alone meanwhile)."""
        if not jobs:
            return
        with self.busy():
            by_engine: dict[str, list[InferenceJob]] = {}
            for job in jobs:
                by_engine.setdefault(self.route(job.model)[0], []).append(job)
            for engine_id, group in by_engine.items():
                self.serve_group(engine_id, group)

    @contextmanager
    def busy(self) -> Iterator[None]:
        """Marked as using its cores for the block (job workers borrow them only while no worker is)."""
        with self._busy_lock:
            self._busy += 1
        try:
            try:
                mark_serving(self.redis, self.id)
            except RedisError as e:  # the heartbeat marks it again
                log.warning("busy mark not set: %s", e)
            yield
        finally:
            with self._busy_lock:
                self._busy -= 1
                try:
                    if not self._busy:
                        clear_serving(self.redis, self.id)
                except RedisError as e:  # the mark lapses by itself
                    log.warning("busy mark not cleared: %s", e)

    def _build_kernel(self) -> None:
        with self.busy():
            lowrank_kernel()

    def run(self) -> None:
        beat = threading.Thread(target=self._heartbeat, daemon=True)
        beat.start()
        device = default_device()
        if device.type == "cpu" and resolve_precision(self.precision, device) in ("int8", "int4"):
            # variants' deltas on a quantised engine use the compiled kernel: built (once per machine) now,
            # not when the first batch of variants is waiting for it
            threading.Thread(target=self._build_kernel, daemon=True, name="lowrank-kernel").start()
        log.info("inference worker %s listening", self.id)
        try:
            while not self.stopping.is_set():
                try:
                    jobs = self._take_batch()
                except RedisConnectionError:
                    if self.stopping.is_set():  # stopped together with Redis (Ctrl-C reaches the whole group)
                        break
                    raise
                self.serve_batch(jobs)
        finally:
            self.stopping.set()
            try:
                self.redis.zrem(WORKERS_KEY, self.id)
                clear_serving(self.redis, self.id)
                self.redis.delete(resident_key(self.id), capacity_key(self.id))
                # requests routed here and not taken: the shared list, for the other workers
                while self.redis.lmove(self.queue, QUEUE_KEY, "LEFT", "RIGHT") is not None:
                    pass
            except RedisConnectionError:
                pass  # Redis is gone too; readers count a worker as live only while its heartbeat is recent
