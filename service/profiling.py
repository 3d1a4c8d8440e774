"""Background profiling: one profile job per model at a time, queued when a model is registered, when a
request finds it unprofiled, or when its observed latency drifts. Nobody waits for it: it goes to the
background queue, which a worker of its own takes (`strata worker --queue background`)."""

from __future__ import annotations

import asyncio
import logging

from redis import Redis

from service.queue import JobQueue, TooManyJobs
from service.schemas import ProfileJobRequest
from workers.jobs.profile import PROFILING_LOCK_PREFIX as LOCK_PREFIX
from workers.settings import Settings
from workers.store.registry import PROFILE_REQUESTS_KEY

log = logging.getLogger("strata")


def request_profile(
    redis: Redis, settings: Settings, model_id: str, if_unprofiled: bool = True
) -> str | None:
    """Queue a profile job for the model unless one is already queued or running; its job id, or None
    when one was already pending (or the queue is full: it will be asked again). With `if_unprofiled`
    the job does nothing when the model has a profile by the time it runs."""
    lock = LOCK_PREFIX + model_id
    if not redis.set(lock, "pending", nx=True, ex=int(settings.profile_wait_s)):
        return None
    try:
        request = ProfileJobRequest(kind="profile", model=model_id, if_unprofiled=if_unprofiled)
        view = JobQueue(redis, settings).submit(request, background=True)
    except TooManyJobs:
        redis.delete(lock)
        return None
    redis.set(lock, view.id, ex=int(settings.profile_wait_s))
    return view.id


def profile_pending(redis: Redis, model_id: str) -> bool:
    return bool(redis.exists(LOCK_PREFIX + model_id))


def drain_once(redis: Redis, settings: Settings) -> list[str]:
    """Queue background profiles for the models registered since the last call; the job ids queued."""
    queued = []
    while (raw := redis.lpop(PROFILE_REQUESTS_KEY)) is not None:
        model_id = raw.decode() if isinstance(raw, bytes) else raw
        if settings.profile_on_register and (job_id := request_profile(redis, settings, model_id)):
            queued.append(job_id)
    return queued


async def drain_profile_requests(redis: Redis, settings: Settings, interval_s: float = 1.0) -> None:
    """Turn models registered anywhere (Registry.add pushes them on PROFILE_REQUESTS_KEY) into background
    profile jobs, until cancelled."""
    while True:
        try:
            await asyncio.to_thread(drain_once, redis, settings)
        except Exception as e:  # noqa: BLE001 - Redis away: try again later
            log.warning("background profiling: %s", e)
        await asyncio.sleep(interval_s)
