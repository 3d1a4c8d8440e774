"""What a job function needs from RQ: its Redis connection, its id, and a progress reporter."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from redis import Redis
from rq import get_current_job
from rq.job import Job

from service.settings import Settings, get_settings
from workers.store.model_store import ModelStore
from workers.store.registry import Registry


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

    def progress(self, done: int, total: int, message: str) -> None:
        """Record progress in the job's meta, at most every `min_interval_s` (and always at the end)."""
        now = time.monotonic()
        if self.job is None or (done < total and now - self._last < self.min_interval_s):
            return
        self._last = now
        self.job.meta["progress"] = round(done / total, 4) if total else 1.0
        self.job.meta["message"] = message
        self.job.save_meta()
