"""/v1/jobs: submit, watch (also as server-sent events) and cancel jobs; /v1/merges also takes a mergekit
YAML body, and /v1/merges/validate dry-runs one."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Body, Depends, HTTPException, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import TypeAdapter, ValidationError
from starlette.concurrency import run_in_threadpool

from service import deps
from service.errors import short_errors
from service.job_events import JobGone, follow_job
from service.merge_plan import MergePlan, dry_run
from service.prechecks import PRECHECKS
from service.queue import JobQueue, job_view
from service.schemas import ERROR_RESPONSES, JobList, JobRequest, JobView, MergeJobRequest, MoeJobRequest
from service.unicode_guard import MESSAGE as SURROGATE_MESSAGE
from service.unicode_guard import has_lone_surrogate
from workers.merge.config import MergeConfigError, parse_yaml
from workers.moe.config import is_moe_recipe
from workers.settings import Settings
from workers.store.model_files import ModelFileError
from workers.store.registry import Registry

router = APIRouter(tags=["jobs"], responses=ERROR_RESPONSES)
QueueDep = Annotated[JobQueue, Depends(deps.job_queue)]
YAML_TYPES = ("application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml")


def _submit(
    request: MergeJobRequest | MoeJobRequest, queue: JobQueue, registry: Registry, settings: Settings
) -> JobView:
    try:
        PRECHECKS[request.kind](request, registry, settings)
    except ModelFileError as e:  # a referenced model directory is malformed or leads outside itself
        raise HTTPException(422, str(e)) from e
    return queue.submit(request)


@router.post("/v1/jobs", response_model=JobView, status_code=202)
def submit_job(
    body: Annotated[JobRequest, Body(discriminator="kind")],
    queue: QueueDep,
    registry: Annotated[Registry, Depends(deps.registry)],
    settings: Annotated[Settings, Depends(deps.settings)],
) -> JobView:
    return _submit(body, queue, registry, settings)


MERGE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "anyOf": [
                        {"$ref": "#/components/schemas/MergeJobRequest"},
                        {"$ref": "#/components/schemas/MoeJobRequest"},
                    ]
                }
            },
            "application/yaml": {
                "schema": {"type": "string", "description": "A mergekit or mergekit-moe YAML config"}
            },
        },
    }
}


async def read_merge(request: Request) -> MergeJobRequest | MoeJobRequest:
    """A merge from the body: a mergekit YAML (`Content-Type: application/yaml`) or its JSON equivalent;
    a mergekit-moe config (recognised by `experts`, `gate_mode`, ...) becomes a `moe` job."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type not in (*YAML_TYPES, "application/json", ""):  # before parsing anything
        raise HTTPException(
            415, f"send the merge as application/yaml or application/json, not {content_type[:80]}"
        )
    raw = await request.body()
    # Parsing and validation are CPU-bound (a large recipe takes seconds): off the event loop.
    return await run_in_threadpool(_parse_merge, raw)


def _parse_merge(raw: bytes) -> MergeJobRequest | MoeJobRequest:
    try:
        data = parse_yaml(raw)  # YAML is a superset of JSON: one parser serves both
    except MergeConfigError as e:
        raise HTTPException(422, str(e)) from e
    if has_lone_surrogate(data):  # YAML's "\ud800" (JSON bodies are checked before routing)
        raise HTTPException(422, SURROGATE_MESSAGE)
    data.setdefault("kind", "moe" if is_moe_recipe(data) else "merge")
    request_type = MoeJobRequest if data["kind"] == "moe" else MergeJobRequest
    try:
        return TypeAdapter(request_type).validate_python(data)
    except ValidationError as e:
        raise HTTPException(422, short_errors(e.errors(include_url=False, include_input=False))) from e


@router.post("/v1/merges", response_model=JobView, status_code=202, openapi_extra=MERGE_BODY)
async def submit_merge(
    request: Request,
    queue: QueueDep,
    registry: Annotated[Registry, Depends(deps.registry)],
    settings: Annotated[Settings, Depends(deps.settings)],
) -> JobView:
    """A merge from a mergekit YAML (`Content-Type: application/yaml`) or its JSON equivalent; a
    mergekit-moe config (recognised by `experts`, `gate_mode`, ...) becomes a `moe` job."""
    merge = await read_merge(request)
    return await run_in_threadpool(_submit, merge, queue, registry, settings)


@router.post("/v1/merges/validate", response_model=MergePlan, openapi_extra=MERGE_BODY)
async def validate_merge(
    request: Request,
    registry: Annotated[Registry, Depends(deps.registry)],
    settings: Annotated[Settings, Depends(deps.settings)],
) -> MergePlan:
    """Dry run: the checks of POST /v1/merges (same 4xx), then every tensor's resolved parameters
    (per merged model and global, at the tensor's layer position); nothing is queued. MoE recipes
    are not covered (422): POST /v1/merges checks them before queueing."""
    merge = await read_merge(request)
    if isinstance(merge, MoeJobRequest):
        raise HTTPException(422, "the dry run covers merge recipes; submit a MoE recipe to POST /v1/merges")
    return await run_in_threadpool(dry_run, merge, registry, settings)


@router.get("/v1/jobs", response_model=JobList)
def list_jobs(queue: QueueDep, limit: int = 100) -> JobList:
    return JobList(data=queue.list(max(1, min(limit, 1000))))


def _fetch(queue: JobQueue, job_id: str):
    job = queue.fetch(job_id)
    if job is None:
        raise HTTPException(404, f"job {job_id!r} not found")
    return job


ENDED = ("finished", "failed", "canceled")


@router.get("/v1/jobs/{job_id}", response_model=JobView)
async def get_job(
    job_id: str,
    queue: QueueDep,
    wait: Annotated[
        float, Query(ge=0, le=600, description="Seconds to wait for the job to end before answering")
    ] = 0,
) -> JobView:
    """The job now, or (with `wait`) as soon as it has ended, or when `wait` seconds have passed."""
    deadline = time.monotonic() + wait
    while True:
        view = job_view(_fetch(queue, job_id))
        if view.status in ENDED or time.monotonic() >= deadline:
            return view
        await asyncio.sleep(min(0.25, max(0.0, deadline - time.monotonic())))


@router.get(
    "/v1/jobs/{job_id}/events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}, "description": "Server-sent events"}},
)
async def job_events(job_id: str, queue: QueueDep, request: Request) -> StreamingResponse:
    """Server-sent events: `event: job` with the job's view (as GET /v1/jobs/{id}) at once and whenever
    its status, progress or message change; the stream ends after the view with an ended status
    (`finished`, `failed`, `canceled`). `curl -N` shows it as it happens."""
    await run_in_threadpool(_fetch, queue, job_id)  # 404 before the stream starts

    async def stream() -> AsyncIterator[str]:
        try:
            async for view in follow_job(queue, job_id):
                if await request.is_disconnected():
                    return
                yield f"event: job\ndata: {view.model_dump_json()}\n\n"
        except JobGone as e:
            yield f"event: error\ndata: {json.dumps({'detail': str(e)})}\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


@router.delete("/v1/jobs/{job_id}", response_model=JobView)
def cancel_job(job_id: str, queue: QueueDep) -> JobView:
    job = _fetch(queue, job_id)
    return queue.cancel(job)
