"""RQ job: measure a model's per-depth latency and quality on this worker's hardware, store it."""

from __future__ import annotations

from typing import Any

from workers.generation.profiler import profile_model
from workers.inference.protocol import latency_key
from workers.inference.worker import load_engine
from workers.jobs.context import JobContext
from workers.store.references import UnknownModelError


def profile_job(spec: dict[str, Any]) -> dict[str, Any]:
    ctx = JobContext.current()
    model_id = spec["model"]
    record = ctx.registry.get(model_id)
    if record is None:
        raise UnknownModelError(f"model {model_id!r} is not registered")
    engine = load_engine(ctx.store.path(model_id))

    def progress(message: str, fraction: float) -> None:
        ctx.progress(int(fraction * 1000), 1000, message)

    profile = profile_model(
        engine,
        grid=spec.get("grid"),
        model_name=model_id,
        prompt_lengths=tuple(spec.get("prompt_lengths", (16, 96))),
        decode_tokens=spec.get("decode_tokens", 8),
        repeats=spec.get("repeats", 2),
        progress=progress,
    )
    record = ctx.registry.get(model_id) or record
    record.profile = profile.model_dump(mode="json")
    if not ctx.registry.update(record):  # deleted meanwhile: never re-register it as a ghost
        raise UnknownModelError(f"model {model_id!r} was deleted while it was profiled")
    ctx.redis.set(latency_key(model_id), profile.latency.model_dump_json())
    return {"model": model_id, "device": profile.device, "grid": profile.grid}
