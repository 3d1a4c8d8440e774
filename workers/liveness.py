"""Process heartbeats: each worker process beats every BEAT_S from a thread of its own, so a process that
stops running (SIGSTOP, a machine frozen, a hang that holds the interpreter) stops beating, and
`strata serve`'s supervisor replaces it (service.supervisor)."""

from __future__ import annotations

import os
import socket
import threading
import time

from redis import Redis

HEARTBEATS_KEY = "strata:heartbeats"  # sorted set: `host:pid` scored by its last beat (unix time)
BEAT_S = 1.0


def member(pid: int | None = None) -> str:
    return f"{socket.gethostname()}:{pid if pid is not None else os.getpid()}"


def start_heartbeat(redis: Redis, stopping: threading.Event | None = None) -> threading.Thread:
    """Beat for this process until `stopping` is set (or the process ends); a Redis outage skips beats."""
    stopping = stopping or threading.Event()
    me = member()

    def beat() -> None:
        while not stopping.is_set():
            try:
                redis.zadd(HEARTBEATS_KEY, {me: time.time()})
            except Exception:  # noqa: BLE001 - Redis away: the supervisor does not judge meanwhile
                pass
            stopping.wait(BEAT_S)

    thread = threading.Thread(target=beat, name="strata-heartbeat", daemon=True)
    thread.start()
    return thread


def heartbeats(redis: Redis) -> dict[str, float]:
    """Every process's last beat, by `host:pid`."""
    return {
        (raw.decode() if isinstance(raw, bytes) else raw): score
        for raw, score in redis.zrange(HEARTBEATS_KEY, 0, -1, withscores=True)
    }


def forget(redis: Redis, pid: int) -> None:
    redis.zrem(HEARTBEATS_KEY, member(pid))
