"""The model registry: one JSON record per model in a Redis hash, with lineage (parents and recipe)."""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, Field
from redis import Redis

KEY = "strata:models"
QUARANTINE_KEY = "strata:models:quarantine"  # records whose files were gone at startup (see reconcile)
PROFILE_REQUESTS_KEY = "strata:profile:requests"  # models registered since; the API profiles them
MAX_PROFILE_REQUESTS = 1000

# Atomically: every required parent is still registered, then HSETNX. Returns "" when added, the first
# missing parent's id, or false when the id is taken.
ADD_WITH_PARENTS = """
for i = 3, #ARGV do
  if redis.call('HEXISTS', KEYS[1], ARGV[i]) == 0 then return ARGV[i] end
end
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 1 then return '' end
return false
"""
MOVE = """
local value = redis.call('HGET', KEYS[1], ARGV[1])
if not value then return 0 end
redis.call('HSET', KEYS[2], ARGV[1], value)
redis.call('HDEL', KEYS[1], ARGV[1])
return 1
"""
# Atomically: unless a registered variant is stored as this model + a delta alone (its full weights
# dropped), HDEL. Returns "" when removed, false when not registered, or that variant's id.
REMOVE_UNLESS_BASE = """
for _, value in ipairs(redis.call('HVALS', KEYS[1])) do
  local record = cjson.decode(value)
  local delta = record['delta']
  if record['base_model'] == ARGV[1] and type(delta) == 'table' and delta['full_weights'] == false then
    return record['id']
  end
end
if redis.call('HDEL', KEYS[1], ARGV[1]) == 1 then return '' end
return false
"""
REPLACE_IF_PRESENT = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
"""


class ParentGoneError(ValueError):
    """A model was deleted while a job built a model from it: the new one is not registered."""


class BaseInUseError(ValueError):
    """A model cannot be deleted while a variant is stored as it + a delta alone."""


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
    base_model: str | None = Field(
        default=None, description="For an adapter: the model it applies to; for a variant: its base"
    )
    files: dict[str, dict[str, Any]] | None = Field(
        default=None, description="config and weights as registered (size, sha256); checked at every load"
    )
    delta: dict[str, Any] | None = Field(
        default=None,
        description="A variant served as base + compressed delta: forms chosen per tensor, worst relative "
        "error, bytes against the base's, and `full_weights` (false: the store holds the delta alone; jobs "
        "read it materialised as base + delta, and its base cannot be deleted before it)",
    )
    eval: dict[str, Any] | None = Field(
        default=None,
        description="Held-out evaluation made by the job that built the model (distill: the accuracy of the "
        "step-by-step student, its baselines and the teacher)",
    )
    chat_template_error: str | None = Field(
        default=None,
        description="Why the model's chat template is unusable (it exceeded the rendering limits when a "
        "request used it); chat requests then get 422. Unset: usable, or not used yet",
    )


def _reply(reply: object) -> str | None:
    """A script's answer: None for false (nil), else its text."""
    if reply is None:
        return None
    return reply.decode() if isinstance(reply, bytes) else str(reply)


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

    def add(self, record: ModelRecord, require: list[str] | tuple[str, ...] = ()) -> bool:
        """Register a new model; False if the id is taken. ParentGoneError (and nothing registered) if any
        id in `require` is no longer registered, checked in the same atomic step. A new model is also put
        on the list of models to profile in the background (see service/profiling.py), an adapter not."""
        missing = _reply(
            self.redis.eval(ADD_WITH_PARENTS, 1, KEY, record.id, record.model_dump_json(), *require)
        )
        if missing is None:
            return False
        if missing:
            raise ParentGoneError(
                f"model {missing!r} was deleted while {record.id!r} was built from it; nothing was registered"
            )
        if record.type == "model":  # an adapter is no model of its own: nothing to profile
            pipe = self.redis.pipeline()
            pipe.rpush(PROFILE_REQUESTS_KEY, record.id)
            pipe.ltrim(PROFILE_REQUESTS_KEY, -MAX_PROFILE_REQUESTS, -1)
            pipe.execute()
        return True

    def update(self, record: ModelRecord) -> bool:
        """Replace a registered model's record; False (and nothing written) if it was deleted meanwhile."""
        return bool(self.redis.eval(REPLACE_IF_PRESENT, 1, KEY, record.id, record.model_dump_json()))

    def mark_chat_template_unusable(self, model_id: str, reason: str) -> None:
        record = self.get(model_id)
        if record is not None and record.chat_template_error is None:
            self.update(record.model_copy(update={"chat_template_error": reason}))

    def remove(self, model_id: str) -> bool:
        """Unregister a model; False if it was not registered. BaseInUseError (nothing removed) while a
        variant is stored as this model + a delta alone, checked in the same atomic step as the delete (a
        job registering such a variant requires its base in one step too: registry.add's `require`)."""
        variant = _reply(self.redis.eval(REMOVE_UNLESS_BASE, 1, KEY, model_id))
        if variant is None:
            return False
        if variant:
            raise BaseInUseError(
                f"model {model_id!r} is the base of {variant!r}, which is stored as a delta to it; delete "
                "or materialise that first"
            )
        return True

    def variants_of(self, model_id: str) -> list[str]:
        """The registered variants stored as `model_id` + a delta alone (they need it to exist)."""
        return [
            r.id
            for r in self.list()
            if r.base_model == model_id and r.delta is not None and r.delta.get("full_weights") is False
        ]

    def quarantine(self, model_id: str) -> bool:
        """Move a record out of the registry into the quarantine hash (kept, restorable by hand)."""
        return bool(self.redis.eval(MOVE, 2, KEY, QUARANTINE_KEY, model_id))
