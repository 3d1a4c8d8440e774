"""RQ job: run a merge recipe and register the merged model."""

from __future__ import annotations

from typing import Any

from workers.jobs.context import JobContext
from workers.jobs.publish import publish_model
from workers.merge.config import MergeConfig
from workers.merge.executor import merge_models
from workers.store.references import resolve_model


def merge_job(spec: dict[str, Any]) -> dict[str, Any]:
    ctx = JobContext.current()
    config = MergeConfig.model_validate({k: v for k, v in spec.items() if k != "kind"})
    s = ctx.settings
    paths = {
        ref: resolve_model(ref, ctx.registry, s.models_dir, s.import_roots) for ref in config.input_models
    }
    model_id = config.name or f"{config.merge_method}-{ctx.job.id[:8]}"
    outcome = {}

    def build(out_dir):
        outcome["result"] = merge_models(
            config, paths, out_dir, max_shard_bytes=s.max_shard_bytes, progress=ctx.progress
        )

    record = publish_model(ctx, model_id, build, parents=config.input_models, recipe=spec)
    result = outcome["result"]
    return {
        "model": record.id,
        "tensors": result.tensors,
        "bytes_written": result.bytes_written,
        "merge_seconds": round(result.seconds, 3),
        "device": result.device,
    }
