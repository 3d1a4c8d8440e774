"""RQ job: run a merge recipe and register the merged model."""

from __future__ import annotations

from typing import Any

from workers.jobs.as_delta import delta_base_dir, describer, store_as_delta
from workers.jobs.context import JobContext
from workers.jobs.publish import publish_model
from workers.merge.config import MergeConfig
from workers.merge.executor import merge_models
from workers.store.references import resolve_model


def merge_job(spec: dict[str, Any]) -> dict[str, Any]:
    ctx = JobContext.current()
    config = MergeConfig.model_validate({k: v for k, v in spec.items() if k != "kind"})
    # a merge naming a registered base_model: stored as that base + a compressed delta (served over it)
    base_dir = delta_base_dir(ctx, config.base_model, config.delta_error_budget)
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
        if base_dir is not None and config.base_model and config.delta_error_budget is not None:
            store_as_delta(ctx, config.base_model, base_dir, out_dir, config.delta_error_budget)

    describe = describer(base_dir, config.keep_full_weights)
    record = publish_model(
        ctx, model_id, build, parents=config.input_models, recipe=spec, describe_with=describe
    )
    result = outcome["result"]
    return {
        "model": record.id,
        "tensors": result.tensors,
        "bytes_written": result.bytes_written,
        "merge_seconds": round(result.seconds, 3),
        "device": result.device,
    }
