"""The job queue: RQ on Redis. Submitting, reading and cancelling jobs; no job logic here."""

from __future__ import annotations

import time
from datetime import UTC, datetime

from pydantic import BaseModel
from redis import Redis
from rq import Queue
from rq.command import send_stop_job_command
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job, JobStatus
from rq.registry import StartedJobRegistry

from service.schemas import JobView
from workers.jobs.context import CANCELED_AT
from workers.jobs.queues import BACKGROUND_QUEUE_NAME, QUEUE_NAME, QUEUE_NAMES
from workers.jobs.recovery import fail_abandoned
from workers.settings import Settings

INDEX = "strata:jobs"
JOB_FUNCTIONS = {
    "merge": "workers.jobs.merge.merge_job",
    "moe": "workers.jobs.moe.moe_job",
    "variants": "workers.jobs.variants.variants_job",
    "profile": "workers.jobs.profile.profile_job",
    "sparsify": "workers.jobs.sparsify.sparsify_job",
    "prune": "workers.jobs.prune.prune_job",
    "grow": "workers.jobs.grow.grow_job",
    "sort": "workers.jobs.sort.sort_job",
    "truncate": "workers.jobs.truncate.truncate_job",
    "materialise": "workers.jobs.materialise.materialise_job",
    "fit_exits": "workers.jobs.fit_exits.fit_exits_job",
    "extract_lora": "workers.jobs.extract_lora.extract_lora_job",
    "finetune": "workers.jobs.finetune.finetune_job",
    "distill": "workers.jobs.distill.distill_job",
}
STATUS = {
    JobStatus.QUEUED: "queued",
    JobStatus.DEFERRED: "queued",
    JobStatus.SCHEDULED: "queued",
    JobStatus.STARTED: "started",
    JobStatus.FINISHED: "finished",
    JobStatus.FAILED: "failed",
    JobStatus.STOPPED: "canceled",
    JobStatus.CANCELED: "canceled",
}


class TooManyJobs(Exception):
    pass


def _utc(moment: datetime | None) -> datetime | None:
    return moment.replace(tzinfo=UTC) if moment and moment.tzinfo is None else moment


def _error(job: Job) -> str | None:
    if job.meta.get("error"):
        return job.meta["error"]
    result = job.latest_result()
    if result is not None and result.exc_string:
        lines = [line for line in result.exc_string.strip().splitlines() if line.strip()]
        return lines[-1] if lines else "job failed"
    return None


def job_view(job: Job) -> JobView:
    status = STATUS.get(job.get_status(refresh=False), "queued")
    started, ended = _utc(job.started_at), _utc(job.ended_at)
    if ended is None and status in ("canceled", "failed"):  # RQ leaves it unset for these
        raw = job.connection.get(CANCELED_AT + job.id) if status == "canceled" else None
        moment = raw.decode() if raw else job.meta.get("ended_at")
        ended = datetime.fromisoformat(moment) if moment else None
    message = job.meta.get("message")
    if status in ("finished", "canceled"):
        message = status
    elapsed = None
    if started:
        elapsed = ((ended or datetime.now(UTC)) - started).total_seconds()
    return JobView(
        id=job.id,
        kind=job.meta.get("kind", "unknown"),
        status=status,
        progress=1.0 if status == "finished" else job.meta.get("progress", 0.0),
        message=message,
        created_at=_utc(job.created_at),
        started_at=started,
        ended_at=ended,
        elapsed_s=round(elapsed, 3) if elapsed is not None else None,
        result=job.return_value(refresh=False) if status == "finished" else None,
        error=_error(job) if status == "failed" else None,
        spec=job.args[0] if job.args else {},
    )


class JobQueue:
    def __init__(self, redis: Redis, settings: Settings):
        self.redis = redis
        self.settings = settings
        self.queue = Queue(QUEUE_NAME, connection=redis)
        self.background = Queue(BACKGROUND_QUEUE_NAME, connection=redis)

    def active(self, kind: str) -> int:
        """Queued and running jobs of one kind."""
        ids = self.queue.get_job_ids() + self.background.get_job_ids()
        for name in QUEUE_NAMES:
            ids += StartedJobRegistry(name, connection=self.redis).get_job_ids()
        jobs = Job.fetch_many(ids, connection=self.redis)
        return sum(1 for job in jobs if job is not None and job.meta.get("kind") == kind)

    def submit(self, request: BaseModel, background: bool = False) -> JobView:
        """Queue a job; `background` jobs go to the background queue, which a worker of its own takes."""
        spec = request.model_dump(mode="json", exclude_none=True)
        kind = spec["kind"]
        if self.active(kind) >= self.settings.max_active_jobs_per_kind:
            raise TooManyJobs(
                f"{self.settings.max_active_jobs_per_kind} {kind} jobs are already queued or running "
                "(STRATA_MAX_ACTIVE_JOBS_PER_KIND); retry when one ends"
            )
        job = (self.background if background else self.queue).enqueue(
            JOB_FUNCTIONS[kind],
            spec,
            job_timeout=self.settings.job_timeout_s,
            result_ttl=self.settings.job_ttl_s,
            failure_ttl=self.settings.job_ttl_s,
            meta={"kind": kind, "progress": 0.0, "message": "queued"},
            description=f"{kind} job",
        )
        self.redis.zadd(INDEX, {job.id: time.time()})
        return job_view(job)

    def fetch(self, job_id: str) -> Job | None:
        try:
            job = Job.fetch(job_id, connection=self.redis)
        except (NoSuchJobError, ValueError):  # ValueError: not a well-formed job id
            return None
        if fail_abandoned(self.redis, job):
            job.refresh()
        return job

    def list(self, limit: int = 100) -> list[JobView]:
        ids = [i.decode() for i in self.redis.zrevrange(INDEX, 0, limit - 1)]
        jobs = Job.fetch_many(ids, connection=self.redis)
        gone = [i for i, job in zip(ids, jobs, strict=True) if job is None]
        if gone:
            self.redis.zrem(INDEX, *gone)
        return [job_view(job) for job in jobs if job is not None]

    def cancel(self, job: Job) -> JobView:
        """Cancel a queued job, or stop a running one (its work-horse is killed, nothing is registered)."""
        status = job.get_status()
        if status in (JobStatus.STARTED, JobStatus.QUEUED, JobStatus.DEFERRED, JobStatus.SCHEDULED):
            # its own key: a running job's worker rewrites the job's meta until it is stopped
            self.redis.set(CANCELED_AT + job.id, datetime.now(UTC).isoformat(), ex=self.settings.job_ttl_s)
        if status == JobStatus.STARTED:
            try:
                send_stop_job_command(self.redis, job.id)
            except InvalidJobOperation:
                pass
            for _ in range(50):  # the worker marks it stopped within a moment
                if job.get_status() != JobStatus.STARTED:
                    break
                time.sleep(0.1)
        elif status in (JobStatus.QUEUED, JobStatus.DEFERRED, JobStatus.SCHEDULED):
            job.cancel()
        job.refresh()
        return job_view(job)
