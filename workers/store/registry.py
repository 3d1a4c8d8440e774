"""The model registry: one JSON record per model in a Redis hash, with lineage (parents and recipe)."""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, Field
from redis import Redis

KEY = "strata:models"
PROFILE_REQUESTS_KEY = "strata:profile:requests"  # models registered since; the API profiles them
MAX_PROFILE_REQUESTS = 1000


class ModelRecord(BaseModel):
    id: str
    architecture: str
    num_layers: int | None
    num_parameters: int
    dtype: str
    size_bytes: int
    parents: list[str] = Field(default_factory=list)
    recipe: dict[str, Any] | None = Field(default=None, description="The job spec that produced the model")
    created: float = Field(default_factory=time.time)
    profile: dict[str, Any] | None = Field(default=None, description="Measured per-depth latency and quality")
    exit_adapters: dict[str, Any] | None = Field(
        default=None, description="Exit adapters stored with the model: exits, recipe, data, fit report"
    )
    type: Literal["model", "adapter"] = Field(
        default="model", description="adapter: a PEFT LoRA adapter, applied on top of `base_model`"
    )
    base_model: str | None = Field(default=None, description="For an adapter: the model it applies to")


class Registry:
    def __init__(self, redis: Redis):
        self.redis = redis

    def get(self, model_id: str) -> ModelRecord | None:
        raw = self.redis.hget(KEY, model_id)
        return ModelRecord.model_validate_json(raw) if raw else None

    def exists(self, model_id: str) -> bool:
        return bool(self.redis.hexists(KEY, model_id))

    def list(self) -> list[ModelRecord]:
        records = [ModelRecord.model_validate_json(v) for v in self.redis.hvals(KEY)]
        return sorted(records, key=lambda r: (r.created, r.id))

    def add(self, record: ModelRecord) -> bool:
        """Register a new model; False if the id is taken. A new model is also put on the list of models
        to profile in the background (see service/profiling.py)."""
        added = bool(self.redis.hsetnx(KEY, record.id, record.model_dump_json()))
        if added:
            pipe = self.redis.pipeline()
            pipe.rpush(PROFILE_REQUESTS_KEY, record.id)
            pipe.ltrim(PROFILE_REQUESTS_KEY, -MAX_PROFILE_REQUESTS, -1)
            pipe.execute()
        return added

    def update(self, record: ModelRecord) -> None:
        self.redis.hset(KEY, record.id, record.model_dump_json())

    def remove(self, model_id: str) -> bool:
        return bool(self.redis.hdel(KEY, model_id))
