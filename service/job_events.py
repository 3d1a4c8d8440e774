"""Following one job: its view whenever status, progress or message change, until it ends."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from starlette.concurrency import run_in_threadpool

from service.queue import JobQueue, job_view
from service.schemas import JobView

ENDED = ("finished", "failed", "canceled")


class JobGone(Exception):
    """The job expired or was removed while being followed."""


async def follow_job(
    queue: JobQueue, job_id: str, poll_s: float = 0.25, heartbeat_s: float = 10.0
) -> AsyncIterator[JobView]:
    """The job's view at once, then on every change of status, progress or message (and every
    `heartbeat_s` regardless, so elapsed time moves and idle connections stay open); ends after the
    view with an ended status."""
    last_key: tuple | None = None
    last_sent = 0.0
    while True:
        job = await run_in_threadpool(queue.fetch, job_id)
        if job is None:
            raise JobGone(f"job {job_id!r} no longer exists")
        view = job_view(job)
        key = (view.status, view.progress, view.message)
        now = time.monotonic()
        if key != last_key or now - last_sent >= heartbeat_s:
            yield view
            last_key, last_sent = key, now
        if view.status in ENDED:
            return
        await asyncio.sleep(poll_s)
