"""OpenAI's fine-tuning API over Strata's `finetune` job: create, list, get, events, cancel.

A fine-tuning job `ftjob-<job id>` is the `finetune` job `<job id>` (also visible at /v1/jobs). Its
hyperparameters map onto the job's: n_epochs -> epochs (auto: 3), batch_size (auto: 8), lr = 1e-4 x
learning_rate_multiplier (auto: 1); full-parameter training, validation loss on `validation_file` ten times
in the run. The fine-tuned model is a registered model, usable at once by id everywhere.
"""

from __future__ import annotations

import math
import random
import re
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Query
from pydantic import BaseModel, ConfigDict, Field
from rq.job import Job
from starlette.concurrency import run_in_threadpool

from service import deps
from service.prechecks import PRECHECKS
from service.queue import JobQueue, job_view
from service.schemas import ERROR_RESPONSES, FinetuneJobRequest, JobView
from workers.settings import Settings
from workers.store.files import TRAINING, FileContentError, FileNotFound, FileStore
from workers.store.model_files import ModelFileError
from workers.store.registry import Registry

router = APIRouter(tags=["fine-tuning"], responses=ERROR_RESPONSES)
QueueDep = Annotated[JobQueue, Depends(deps.job_queue)]
PREFIX = "ftjob-"
JOB_ID = re.compile(r"^ftjob-[0-9a-f-]{36}$")
BASE_LR = 1e-4
AUTO_EPOCHS, AUTO_BATCH = 3, 8
STATUS = {
    "queued": "queued",
    "started": "running",
    "finished": "succeeded",
    "failed": "failed",
    "canceled": "cancelled",
}
Auto = Literal["auto"]


class Hyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    n_epochs: Auto | Annotated[int, Field(ge=1, le=50)] = "auto"
    batch_size: Auto | Annotated[int, Field(ge=1, le=256)] = "auto"
    learning_rate_multiplier: Auto | Annotated[float, Field(gt=0, le=100)] = "auto"


class Supervised(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hyperparameters: Hyperparameters | None = None


class Method(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["supervised"] = Field(description="Only supervised fine-tuning is offered")
    supervised: Supervised | None = None


class FineTuningJobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    model: str = Field(min_length=1, max_length=256, description="A registered model id")
    training_file: str = Field(min_length=1, max_length=64, description="An uploaded file id (file-...)")
    validation_file: str | None = Field(default=None, max_length=64)
    suffix: str | None = Field(default=None, pattern=r"^[A-Za-z0-9._-]{1,40}$")
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1)
    hyperparameters: Hyperparameters | None = None
    method: Method | None = None
    metadata: dict[str, str] | None = Field(default=None, max_length=16, description="Accepted, not used")


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


class FineTuningJob(BaseModel):
    """OpenAI's fine_tuning.job object, plus Strata's job under `strata`."""

    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    finished_at: int | None = None
    model: str
    fine_tuned_model: str | None = None
    organization_id: str = "strata"
    result_files: list[str] = []
    status: Literal["validating_files", "queued", "running", "succeeded", "failed", "cancelled"]
    training_file: str | None = None
    validation_file: str | None = None
    hyperparameters: dict[str, Any]
    method: dict[str, Any]
    trained_tokens: int | None = None
    error: JobError | None = None
    seed: int
    user_provided_suffix: str | None = None
    estimated_finish: int | None = None
    integrations: list[dict[str, Any]] | None = None
    strata: JobView


class FineTuningJobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningJob]
    has_more: bool


class FineTuningEvent(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    type: Literal["message", "metrics"]
    data: dict[str, Any] | None = None


class FineTuningEventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningEvent]
    has_more: bool


def _time(moment: datetime | None) -> int | None:
    return int(moment.timestamp()) if moment else None


def to_request(body: FineTuningJobCreate, records: int) -> FinetuneJobRequest:
    """The `finetune` job of an OpenAI request, "auto" resolved; validation ten times in the run."""
    hyper = body.hyperparameters
    if body.method is not None and body.method.supervised is not None:
        hyper = body.method.supervised.hyperparameters or hyper
    hyper = hyper or Hyperparameters()
    epochs = AUTO_EPOCHS if hyper.n_epochs == "auto" else hyper.n_epochs
    batch = AUTO_BATCH if hyper.batch_size == "auto" else hyper.batch_size
    multiplier = 1.0 if hyper.learning_rate_multiplier == "auto" else hyper.learning_rate_multiplier
    steps = epochs * math.ceil(records / batch)
    return FinetuneJobRequest(
        kind="finetune",
        model=body.model,
        training_file=body.training_file,
        validation_file=body.validation_file,
        epochs=epochs,
        batch_size=batch,
        lr=BASE_LR * multiplier,
        seed=body.seed if body.seed is not None else random.randrange(2**31),
        eval_every=max(1, steps // 10) if body.validation_file else None,
        suffix=body.suffix,
    )


def to_openai(view: JobView) -> FineTuningJob:
    spec = view.spec
    status = STATUS[view.status]
    result = view.result or {}
    error = None
    if view.status == "failed":
        error = JobError(code="fine_tuning_failed", message=view.error or "the job failed")
    hyper = {
        "n_epochs": spec.get("epochs") or spec.get("steps") or 1,
        "batch_size": spec.get("batch_size", 8),
        "learning_rate_multiplier": round(spec.get("lr", BASE_LR) / BASE_LR, 6),
    }
    return FineTuningJob(
        id=PREFIX + view.id,
        created_at=_time(view.created_at) or 0,
        finished_at=_time(view.ended_at) if status in ("succeeded", "failed", "cancelled") else None,
        model=spec.get("model", ""),
        fine_tuned_model=result.get("model"),
        status=status,
        training_file=spec.get("training_file"),
        validation_file=spec.get("validation_file"),
        hyperparameters=hyper,
        method={"type": "supervised", "supervised": {"hyperparameters": hyper}},
        trained_tokens=result.get("trained_tokens"),
        error=error,
        seed=spec.get("seed", 0),
        user_provided_suffix=spec.get("suffix"),
        strata=view,
    )


def _after(items: list, after: str | None) -> list:
    """The items after the one whose id is `after` (all without `after`, none when it is unknown)."""
    if after is None:
        return items
    ids = [item.id for item in items]
    return items[ids.index(after) + 1 :] if after in ids else []


def _job(queue: JobQueue, ft_id: str) -> Job:
    job = queue.fetch(ft_id.removeprefix(PREFIX)) if JOB_ID.match(ft_id) else None
    if job is None or job.meta.get("kind") != "finetune":
        raise HTTPException(404, f"fine-tuning job {ft_id[:80]!r} not found")
    return job


def _create(
    body: FineTuningJobCreate, queue: JobQueue, registry: Registry, settings: Settings
) -> FineTuningJob:
    try:
        store = FileStore(settings.files_dir, settings.max_file_bytes)
        records = store.of_purpose(body.training_file, TRAINING).records
    except (FileNotFound, FileContentError) as e:
        raise HTTPException(400, f"training_file: {e}") from e
    request = to_request(body, records)
    try:
        PRECHECKS["finetune"](request, registry, settings)
    except ModelFileError as e:
        raise HTTPException(422, str(e)) from e
    return to_openai(queue.submit(request))


@router.post("/v1/fine_tuning/jobs", response_model=FineTuningJob)
async def create_job(
    body: FineTuningJobCreate,
    queue: QueueDep,
    registry: Annotated[Registry, Depends(deps.registry)],
    settings: Annotated[Settings, Depends(deps.settings)],
) -> FineTuningJob:
    """Fine-tune `model` on an uploaded training file; the job is checked (model, files, sizes) first."""
    return await run_in_threadpool(_create, body, queue, registry, settings)


@router.get("/v1/fine_tuning/jobs", response_model=FineTuningJobList)
def list_jobs(
    queue: QueueDep, after: str | None = None, limit: Annotated[int, Query(ge=1, le=1000)] = 20
) -> FineTuningJobList:
    """Newest first; `after`: the last id of the previous page."""
    jobs = _after([to_openai(v) for v in queue.list(1000) if v.kind == "finetune"], after)
    return FineTuningJobList(data=jobs[:limit], has_more=len(jobs) > limit)


@router.get("/v1/fine_tuning/jobs/{ft_id}", response_model=FineTuningJob)
def get_job(ft_id: str, queue: QueueDep) -> FineTuningJob:
    return to_openai(job_view(_job(queue, ft_id)))


@router.get("/v1/fine_tuning/jobs/{ft_id}/events", response_model=FineTuningEventList)
def job_events(
    ft_id: str, queue: QueueDep, after: str | None = None, limit: Annotated[int, Query(ge=1, le=1000)] = 20
) -> FineTuningEventList:
    """Newest first: creation, the job's own events (one `metrics` event per step with its losses), and
    how it ended; `after`: the last id of the previous page."""
    job = _job(queue, ft_id)
    view = job_view(job)
    created = _time(view.created_at) or 0
    raw = [{"created_at": created, "level": "info", "message": f"Created fine-tuning job: {ft_id}"}]
    raw += list(job.meta.get("events", []))
    ended = _time(view.ended_at) or (raw[-1]["created_at"] if raw else created)
    if view.status == "finished":
        raw.append({"created_at": ended, "level": "info", "message": "The job has successfully completed"})
    elif view.status == "failed":
        raw.append({"created_at": ended, "level": "error", "message": f"The job failed: {view.error}"})
    elif view.status == "canceled":
        raw.append({"created_at": ended, "level": "info", "message": "The job was cancelled"})
    events = [
        FineTuningEvent(
            id=f"ftevent-{view.id}-{i}",
            created_at=e["created_at"],
            level=e.get("level", "info"),
            message=e["message"],
            type="metrics" if e.get("data") else "message",
            data=e.get("data"),
        )
        for i, e in enumerate(raw)
    ][::-1]
    events = _after(events, after)
    return FineTuningEventList(data=events[:limit], has_more=len(events) > limit)


@router.post("/v1/fine_tuning/jobs/{ft_id}/cancel", response_model=FineTuningJob)
def cancel_job(ft_id: str, queue: QueueDep) -> FineTuningJob:
    """Stop the job; nothing is registered and no partial files stay."""
    return to_openai(queue.cancel(_job(queue, ft_id)))
