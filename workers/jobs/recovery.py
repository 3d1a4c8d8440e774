"""Jobs whose worker died (killed, machine lost) are marked failed with the reason, not left 'started'."""

from __future__ import annotations

import socket
from datetime import UTC, datetime

from redis import Redis
from rq import Queue, Worker
from rq.job import Job, JobStatus
from rq.registry import StartedJobRegistry

from workers.jobs.queues import QUEUE_NAMES
from workers.processes import process_alive


def worker_is_dead(redis: Redis, worker_name: str | None) -> bool:
    """The worker's registration is gone, or it is a process of this host that no longer exists."""
    if not worker_name:
        return False
    worker = Worker.find_by_key(Worker.redis_worker_namespace_prefix + worker_name, connection=redis)
    if worker is None:
        return True
    return (
        worker.hostname == socket.gethostname() and worker.pid is not None and not process_alive(worker.pid)
    )


def fail_abandoned(redis: Redis, job: Job, reason: str | None = None) -> bool:
    """Mark a 'started' job failed if its worker is dead; True if it was."""
    if job.get_status() != JobStatus.STARTED or not worker_is_dead(redis, job.worker_name):
        return False
    reason = reason or (
        f"worker {job.worker_name} died while running the job (killed or lost); nothing was registered"
    )
    job.meta["error"] = f"AbandonedJobError: {reason}"
    job.meta["message"] = "failed"
    job.meta["ended_at"] = datetime.now(UTC).isoformat()
    job.save_meta()
    queue = Queue(job.origin, connection=redis)
    with redis.pipeline() as pipe:
        job.set_status(JobStatus.FAILED, pipeline=pipe)
        StartedJobRegistry(job.origin, connection=redis).remove_executions(job, pipeline=pipe)
        queue.failed_job_registry.add(job, ttl=job.failure_ttl, exc_string=reason, pipeline=pipe)
        pipe.execute()
    return True


def reap_abandoned(redis: Redis, queue_name: str) -> list[str]:
    """Fail every started job of the queue whose worker is dead."""
    registry = StartedJobRegistry(queue_name, connection=redis)
    reaped = []
    for job in Job.fetch_many(registry.get_job_ids(), connection=redis):
        if job is not None and fail_abandoned(redis, job):
            reaped.append(job.id)
    return reaped


def fail_jobs_of(redis: Redis, pid: int, reason: str) -> list[str]:
    """Fail the started jobs of this host's worker process `pid` (which has just been killed), with
    `reason`; their ids."""
    names = {
        w.name for w in Worker.all(connection=redis) if w.pid == pid and w.hostname == socket.gethostname()
    }
    failed = []
    for queue_name in QUEUE_NAMES:
        registry = StartedJobRegistry(queue_name, connection=redis)
        for job in Job.fetch_many(registry.get_job_ids(), connection=redis):
            if job is not None and job.worker_name in names and fail_abandoned(redis, job, reason):
                failed.append(job.id)
    return failed
