"""Request and response bodies of the HTTP API."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from workers.merge.config import MODEL_ID, MergeConfig
from workers.store.registry import ModelRecord


def _slug(v: str | None) -> str | None:
    if v is not None and not MODEL_ID.match(v):
        raise ValueError(f"{v!r} is not a valid model id (letters, digits, '.', '_', '-'; at most 128)")
    return v


class MergeJobRequest(MergeConfig):
    """A merge: mergekit's YAML schema (models form) as JSON, plus `name` and `seed`."""

    kind: Literal["merge"] = "merge"


class VariantsJobRequest(BaseModel):
    """Fine-tune-like variants `<prefix>-1..count`: theta + delta, rms(delta) = scale * rms(theta)."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["variants"]
    base: str = Field(min_length=1)
    count: int = Field(default=2, ge=1, le=16)
    scale: float = Field(default=1e-3, gt=0, le=1)
    rank: int | None = Field(default=None, ge=1, description="Low-rank deltas of this rank (dense if unset)")
    seed: int = 0
    prefix: str | None = None

    _check_prefix = field_validator("prefix")(_slug)

    @property
    def output_ids(self) -> list[str]:
        return [f"{self.prefix}-{i + 1}" for i in range(self.count)]


class ProfileJobRequest(BaseModel):
    """Measure per-depth latency (prefill and decode) and quality (perplexity, top-1 agreement) on the
    worker's hardware; stored with the model and used to pick depths for latency budgets."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["profile"]
    model: str = Field(min_length=1)
    grid: list[int] | None = Field(default=None, description="Exit depths (default every 2 layers + full)")
    repeats: int = Field(default=2, ge=1, le=10)


JobRequest = Annotated[MergeJobRequest | VariantsJobRequest | ProfileJobRequest, Field(discriminator="kind")]

JobStatus = Literal["queued", "started", "finished", "failed", "canceled"]


class JobView(BaseModel):
    id: str
    kind: str
    status: JobStatus
    progress: float = Field(ge=0, le=1)
    message: str | None = None
    created_at: datetime | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None
    elapsed_s: float | None = Field(default=None, description="Run time so far, or in all once ended")
    result: dict[str, Any] | None = None
    error: str | None = None
    spec: dict[str, Any]


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobView]


class ModelObject(BaseModel):
    """OpenAI's model object, with Strata's registry record under `strata`."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "strata"
    strata: ModelRecord

    @classmethod
    def of(cls, record: ModelRecord) -> ModelObject:
        return cls(id=record.id, created=int(record.created), strata=record)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelObject]


class ModelDeleted(BaseModel):
    id: str
    object: Literal["model"] = "model"
    deleted: bool = True


class ImportRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(description="The id to register the model under")
    path: str = Field(description="A Hugging Face directory (config.json + safetensors) under an import root")

    _check_id = field_validator("id")(_slug)


class ErrorBody(BaseModel):
    """Every 4xx/5xx: `detail` says what is wrong (a message, or pydantic's list of field errors)."""

    detail: str | list[dict[str, Any]]


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text}
    for code, text in {
        401: "Missing or invalid API key",
        404: "Unknown model or job",
        409: "The output id is taken",
        413: "Request body too large",
        415: "Unsupported content type",
        422: "Invalid request",
        429: "Too many queued requests or jobs; see Retry-After",
        503: "Redis or the inference workers are unavailable",
        507: "Not enough disk for the output model",
    }.items()
}


class Health(BaseModel):
    status: Literal["ok", "degraded"]
    redis: bool
    workers: int = Field(description="Live job workers")
    inference_workers: int = Field(default=0, description="Live inference workers")
