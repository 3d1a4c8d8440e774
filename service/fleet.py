"""Which job and inference workers are alive right now.

A registration alone is not proof: a worker killed with SIGKILL leaves its RQ registration (for minutes)
and its last heartbeat (for WORKER_TTL_S). Workers of this host are also checked by process id, so a
dead one stops counting at once; workers elsewhere count while their registration or heartbeat is fresh.
"""

from __future__ import annotations

import json
import socket
import time

from redis import Redis
from rq import Worker

from workers.inference.protocol import WORKER_TTL_S, WORKERS_KEY, capacity_key, capacity_of, resident_key
from workers.jobs.queues import QUEUE_NAME
from workers.processes import process_alive


def _alive(hostname: str | None, pid: int | None) -> bool:
    return hostname != socket.gethostname() or pid is None or process_alive(pid)


def live_job_workers(redis: Redis) -> list[Worker]:
    """Live workers that take users' jobs (a background-only worker is not one)."""
    return [
        w for w in Worker.all(connection=redis) if QUEUE_NAME in w.queue_names() and _alive(w.hostname, w.pid)
    ]


def inference_worker_alive(worker_id: str, heartbeat: float | None) -> bool:
    """Ids are `host:pid:nonce` (see InferenceWorker); the heartbeat must be younger than WORKER_TTL_S."""
    if heartbeat is None or heartbeat < time.time() - WORKER_TTL_S:
        return False
    host, _, rest = worker_id.partition(":")
    pid = rest.partition(":")[0]
    return _alive(host, int(pid)) if pid.isdigit() else True


def fresh_heartbeats(redis: Redis) -> list:
    """(worker id, heartbeat) of the inference workers heard from within WORKER_TTL_S (a pipeline will do
    as `redis`: its reply goes to `live_among`)."""
    return redis.zrangebyscore(WORKERS_KEY, time.time() - WORKER_TTL_S, "+inf", withscores=True)


def live_among(beats: list) -> list[str]:
    """The ids of `fresh_heartbeats`'s reply whose workers are alive."""
    ids = [(raw.decode() if isinstance(raw, bytes) else raw, score) for raw, score in beats]
    return [worker_id for worker_id, score in ids if inference_worker_alive(worker_id, score)]


def live_inference_workers(redis: Redis) -> list[str]:
    return live_among(fresh_heartbeats(redis))


def inference_worker_heartbeat(redis: Redis, worker_id: str) -> float | None:
    return redis.zscore(WORKERS_KEY, worker_id)


def resident_models(redis: Redis) -> dict[str, dict]:
    """Per live inference worker: the bases (and plain models) it holds and the variants held over each."""
    workers = live_inference_workers(redis)
    if not workers:
        return {}
    raw = redis.mget([resident_key(worker) for worker in workers])
    return {worker: json.loads(value) for worker, value in zip(workers, raw, strict=True) if value}


def worker_capacities(redis: Redis, workers: list[str]) -> dict[str, int]:
    """Per inference worker of `workers` (the live ones) that reports it: the bases it keeps loaded."""
    if not workers:
        return {}
    raw = redis.mget([capacity_key(worker) for worker in workers])
    return {
        worker: capacity_of(value) for worker, value in zip(workers, raw, strict=True) if value is not None
    }
