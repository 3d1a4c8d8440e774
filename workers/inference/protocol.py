"""What the API and the inference workers exchange through Redis.

- requests: a list per inference worker (RPUSH by the API, which routes each request to a worker that holds
  its base: `service.generation.routing`) and a shared list any worker takes from when its own is empty
  (requests with no worker to route to); workers BLPOP their own list first; bounded by the API;
- events: one Redis stream per request (started, token, finish or error entries), expiring after a while;
  a request that is not streamed gets a token entry a few times a second only (workers.inference.events);
- liveness: a sorted set of worker ids (`host:pid:nonce`) scored by their last heartbeat;
- residency: per worker, the bases it holds (with the variants over each and how often it loaded each),
  written with every heartbeat and at once when it loads or drops a base; the API routes by it;
- claims: per worker, the bases the API has sent it that it does not report yet (their loads in flight),
  with when, so a burst of requests for a new base all go to one worker and the next new base elsewhere;
- cancellation: a key per request the API has given up on (client gone, worker stalled); workers skip
  such requests, or drop them from their batch between steps;
- the live latency model of each model, updated by workers after every request.
"""

from __future__ import annotations

import time

from pydantic import BaseModel, Field

from workers.composition import Computed
from workers.generation.engine import GenerationRequest

QUEUE_KEY = "strata:infer:queue"
WORKERS_KEY = "strata:infer:workers"
SERVICE_MS_KEY = "strata:infer:service-ms"
EVENTS_PREFIX = "strata:infer:events:"
LATENCY_PREFIX = "strata:latency:"
HEARTBEAT_S = 2.0
WORKER_TTL_S = 10.0
EVENTS_TTL_S = 600
CANCEL_PREFIX = "strata:infer:cancel:"
RESIDENT_PREFIX = "strata:infer:resident:"  # per worker: its loaded bases and the variants held over each
WORKER_QUEUE_PREFIX = QUEUE_KEY + ":"  # per worker: the requests routed to it
CLAIMS_PREFIX = "strata:infer:claims:"  # per worker: a hash, base -> when the API last routed it there
CAPACITY_PREFIX = "strata:infer:capacity:"  # per worker: how many bases it keeps loaded (--max-models)
CLAIM_S = 60.0  # a claim counts this long after the last request routed by it


class Speculation(BaseModel):
    draft_depth: int
    num_draft_tokens: int


class InferenceJob(BaseModel):
    model: str
    request: GenerationRequest
    speculative: Speculation | None = None
    # a per-request merge: base (`model`) + sum_i c_i D_i of these variants of it, or a TIES/DARE recipe
    # over them (workers.composition)
    merge: list[tuple[str, float]] | Computed | None = None
    enqueued_at: float = Field(default_factory=time.time)
    predicted_ms: float | None = None
    stream: bool = True  # the client reads tokens as they come (else only the finish matters to it)
    stream_interval_ms: float = 0.0  # streamed: tokens within this long of the last entry share the next


def events_key(request_id: str) -> str:
    return EVENTS_PREFIX + request_id


def cancel_key(request_id: str) -> str:
    return CANCEL_PREFIX + request_id


def resident_key(worker_id: str) -> str:
    return RESIDENT_PREFIX + worker_id


def capacity_key(worker_id: str) -> str:
    return CAPACITY_PREFIX + worker_id


def capacity_of(raw: bytes | str | None) -> int:
    """A worker's reported capacity (1 when it reports none, or nothing readable)."""
    try:
        return max(1, int(raw)) if raw is not None else 1
    except ValueError:
        return 1


def worker_queue_key(worker_id: str) -> str:
    return WORKER_QUEUE_PREFIX + worker_id


def claims_key(worker_id: str) -> str:
    return CLAIMS_PREFIX + worker_id


def latency_key(model_id: str) -> str:
    return LATENCY_PREFIX + model_id
