"""/v1/jobs: submit, watch and cancel jobs; /v1/merges also takes a mergekit YAML body."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Depends, HTTPException, Request
from pydantic import TypeAdapter, ValidationError
from starlette.concurrency import run_in_threadpool

from service import deps
from service.prechecks import PRECHECKS
from service.queue import JobQueue, job_view
from service.schemas import ERROR_RESPONSES, JobList, JobRequest, JobView, MergeJobRequest, MoeJobRequest
from service.settings import Settings
from workers.merge.config import MergeConfigError, parse_yaml
from workers.moe.config import is_moe_recipe
from workers.store.registry import Registry

router = APIRouter(tags=["jobs"], responses=ERROR_RESPONSES)
QueueDep = Annotated[JobQueue, Depends(deps.job_queue)]
YAML_TYPES = ("application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml")


def _submit(
    request: MergeJobRequest | MoeJobRequest, queue: JobQueue, registry: Registry, settings: Settings
) -> JobView:
    PRECHECKS[request.kind](request, registry, settings)
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


@router.post("/v1/merges", response_model=JobView, status_code=202, openapi_extra=MERGE_BODY)
async def submit_merge(
    request: Request,
    queue: QueueDep,
    registry: Annotated[Registry, Depends(deps.registry)],
    settings: Annotated[Settings, Depends(deps.settings)],
) -> JobView:
    """A merge from a mergekit YAML (`Content-Type: application/yaml`) or its JSON equivalent; a
    mergekit-moe config (recognised by `experts`, `gate_mode`, ...) becomes a `moe` job."""
    raw = await request.body()
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    try:
        data = parse_yaml(raw)  # YAML is a superset of JSON: one parser serves both
    except MergeConfigError as e:
        raise HTTPException(422, str(e)) from e
    if content_type not in (*YAML_TYPES, "application/json", ""):
        raise HTTPException(
            415, f"send the merge as application/yaml or application/json, not {content_type}"
        )
    data.setdefault("kind", "moe" if is_moe_recipe(data) else "merge")
    request_type = MoeJobRequest if data["kind"] == "moe" else MergeJobRequest
    try:
        merge = TypeAdapter(request_type).validate_python(data)
    except ValidationError as e:
        raise HTTPException(
            422, e.errors(include_url=False, include_context=False, include_input=False)
        ) from e
    return await run_in_threadpool(_submit, merge, queue, registry, settings)


@router.get("/v1/jobs", response_model=JobList)
def list_jobs(queue: QueueDep, limit: int = 100) -> JobList:
    return JobList(data=queue.list(max(1, min(limit, 1000))))


def _fetch(queue: JobQueue, job_id: str):
    job = queue.fetch(job_id)
    if job is None:
        raise HTTPException(404, f"job {job_id!r} not found")
    return job


@router.get("/v1/jobs/{job_id}", response_model=JobView)
def get_job(job_id: str, queue: QueueDep) -> JobView:
    return job_view(_fetch(queue, job_id))


@router.delete("/v1/jobs/{job_id}", response_model=JobView)
def cancel_job(job_id: str, queue: QueueDep) -> JobView:
    job = _fetch(queue, job_id)
    return queue.cancel(job)
