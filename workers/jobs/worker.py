"""The RQ worker class: each job runs in a forked work-horse, on the inference workers' cores too while they
are idle (`workers.jobs.borrowed_cores`); after each, leftovers of killed horses go."""

from __future__ import annotations

from rq import Queue, Worker
from rq.executions import Execution
from rq.job import Job

from workers.jobs.borrowed_cores import job_borrower
from workers.processes import die_with_parent
from workers.settings import get_settings
from workers.store.model_store import ModelStore
from workers.threads import rebuild_after_fork


class StrataWorker(Worker):
    def main_work_horse(self, job: Job, queue: Queue) -> None:
        die_with_parent()  # a killed worker takes its work-horse along, so the job cannot run on unsupervised
        rebuild_after_fork()  # before the job starts threads of its own
        super().main_work_horse(job, queue)

    def perform_job(self, job: Job, queue: Queue, execution: Execution) -> bool:
        borrower = job_borrower(self.connection, job.id)
        borrower.start()
        try:
            return super().perform_job(job, queue, execution)
        finally:
            borrower.stop()

    def execute_job(self, job: Job, queue: Queue) -> None:
        try:
            super().execute_job(job, queue)
        finally:
            # A stopped or killed work-horse cannot clean its staging directory; its parent does.
            ModelStore(get_settings().models_dir).clean_stale_staging()
