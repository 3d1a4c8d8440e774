"""RQ job: measure a model's per-depth latency and quality on this worker's hardware, store it."""

from __future__ import annotations

from typing import Any

from workers.generation.profiler import ModelProfile, Progress, profile_model
from workers.inference.protocol import latency_key
from workers.inference.worker import load_engine
from workers.jobs.context import JobContext
from workers.store.file_manifest import verify_files
from workers.store.references import UnknownModelError

PROFILING_LOCK_PREFIX = "strata:profiling:"  # + model id: a background profile is queued or running


def profile_and_store(
    ctx: JobContext, model_id: str, progress: Progress | None = None, **options: Any
) -> ModelProfile:
    """Profile a registered model (quality with and without its exit adapters, when it has some), store the
    profile in its registry record and its latency model where the API reads it."""
    record = ctx.registry.get(model_id)
    if record is None:
        raise UnknownModelError(f"model {model_id!r} is not registered")
    verify_files(model_id, ctx.store.path(model_id), record.files)
    engine = load_engine(ctx.store.path(model_id), precision=ctx.settings.infer_precision)  # as served
    profile = profile_model(engine, model_name=model_id, progress=progress, **options)
    record = ctx.registry.get(model_id) or record
    record.profile = profile.model_dump(mode="json")
    if not ctx.registry.update(record):  # deleted meanwhile: never re-register it as a ghost
        raise UnknownModelError(f"model {model_id!r} was deleted while it was profiled")
    ctx.redis.set(latency_key(model_id), profile.latency.model_dump_json())
    return profile


def profile_job(spec: dict[str, Any]) -> dict[str, Any]:
    ctx = JobContext.current()
    model_id = spec["model"]
    try:
        return _profile(ctx, spec, model_id)
    finally:
        ctx.redis.delete(PROFILING_LOCK_PREFIX + model_id)


def _profile(ctx: JobContext, spec: dict[str, Any], model_id: str) -> dict[str, Any]:
    record = ctx.registry.get(model_id)
    if spec.get("if_unprofiled") and record is not None and record.profile:
        return {"model": model_id, "skipped": "the model has a profile already"}

    def progress(message: str, fraction: float) -> None:
        ctx.progress(int(fraction * 1000), 1000, message)

    profile = profile_and_store(
        ctx,
        model_id,
        progress,
        grid=spec.get("grid"),
        prompt_lengths=tuple(spec.get("prompt_lengths", (16, 96))),
        decode_tokens=spec.get("decode_tokens", 8),
        repeats=spec.get("repeats", 2),
    )
    return {"model": model_id, "device": profile.device, "grid": profile.grid}
