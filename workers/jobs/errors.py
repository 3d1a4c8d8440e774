"""RQ exception handler: keep a one-line reason with every failed job."""

from __future__ import annotations

from rq.job import Job


def record_error(job: Job, exc_type: type[BaseException], exc_value: BaseException, tb) -> bool:
    job.meta["error"] = f"{exc_type.__name__}: {exc_value}"
    job.meta["message"] = "failed"
    job.save_meta()
    return True  # let RQ's default handling (move to the failed registry) run too
