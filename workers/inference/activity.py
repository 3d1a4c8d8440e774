"""Whether any inference worker is generating now, for job workers that borrow idle cores.

Each inference worker adds itself to a sorted set while it serves a batch, scored by when its mark expires
(SERVING_TTL_S on; its heartbeat renews the mark while a long batch runs), and removes itself when the
batch is done. Inference is busy while some mark has not expired or a request waits in the shared queue;
a worker that dies mid-batch stops counting once its mark expires.
"""

from __future__ import annotations

import time

from redis import Redis

from workers.inference.protocol import QUEUE_KEY

SERVING_KEY = "strata:infer:serving"  # worker id -> until when (unix seconds) it counts as generating
SERVING_TTL_S = 10.0


def mark_serving(redis: Redis, worker_id: str, now: float | None = None) -> None:
    """`worker_id` is generating (for SERVING_TTL_S from `now`, unless renewed or cleared)."""
    redis.zadd(SERVING_KEY, {worker_id: (now or time.time()) + SERVING_TTL_S})


def clear_serving(redis: Redis, worker_id: str) -> None:
    """`worker_id` has finished its batch."""
    redis.zrem(SERVING_KEY, worker_id)


def inference_busy(redis: Redis, now: float | None = None) -> bool:
    """Some inference worker is generating, or a request waits for one."""
    with redis.pipeline(transaction=False) as pipe:
        pipe.zcount(SERVING_KEY, f"({now or time.time()}", "+inf")
        pipe.llen(QUEUE_KEY)
        serving, waiting = pipe.execute()
    return bool(serving or waiting)
