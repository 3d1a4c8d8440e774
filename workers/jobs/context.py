"""What a job function needs from RQ: its Redis connection, its id, and a progress reporter."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from redis import Redis
from rq import get_current_job
from rq.job import Job

from workers.settings import Settings, get_settings
from workers.store.model_store import ModelStore
from workers.store.registry import Registry

CANCELED_AT = "strata:jobs:canceled-at:"  # + job id: set when a user cancels the job

MAX_EVENTS = 1000  # a job's newest events kept


@dataclass
class JobContext:
    job: Job | None
    redis: Redis
    settings: Settings
    min_interval_s: float = 0.5
    _last: float = field(default=0.0, init=False)

    @classmethod
    def current(cls) -> JobContext:
        job = get_current_job()
        if job is None:
            raise RuntimeError("not running inside an RQ job")
        ctx = cls(job, job.connection, get_settings())
        ctx.job.meta["message"] = "started"
        ctx.job.save_meta()
        return ctx

    @property
    def registry(self) -> Registry:
        return Registry(self.redis)

    @property
    def store(self) -> ModelStore:
        return ModelStore(self.settings.models_dir)

    def progress(self, done: int, total: int, message: str, force: bool = False) -> None:
        """Record progress in the job's meta, at most every `min_interval_s` (always at the end, and when
        `force`d: a new phase must show at once)."""
        now = time.monotonic()
        throttled = done < total and now - self._last < self.min_interval_s
        if self.job is None or (throttled and not force):
            return
        self._last = now
        self.job.meta["progress"] = round(done / total, 4) if total else 1.0
        self.job.meta["message"] = message
        self.job.save_meta()

    def event(self, message: str, level: str = "info", data: dict | None = None) -> None:
        """Append an event (the fine-tuning API's /events) to the job's meta, the newest MAX_EVENTS kept;
        it is also the job's current message."""
        if self.job is None:
            return
        events = self.job.meta.setdefault("events", [])
        events.append({"created_at": int(time.time()), "level": level, "message": message, "data": data})
        del events[:-MAX_EVENTS]
        self.job.meta["message"] = message
        self.job.save_meta()

    def cancel_requested(self) -> bool:
        """A user asked to cancel this job (its work-horse is being stopped; stop sooner if you can)."""
        return self.job is not None and bool(self.redis.exists(CANCELED_AT + self.job.id))

    def note(self, message: str) -> None:
        """Say what runs now, keeping the progress where it is."""
        if self.job is None:
            return
        self.job.meta["message"] = message
        self.job.save_meta()

    def phase(self, start: float, end: float, name: str) -> Callable[[int, int, str], None]:
        """A progress reporter for one phase of the job: its 0..1 maps onto start..end of the whole, and
        messages are prefixed with the phase's name."""

        def report(done: int, total: int, message: str) -> None:
            fraction = done / total if total else 1.0
            self.progress(round((start + (end - start) * fraction) * 10_000), 10_000, f"{name}: {message}")

        return report
