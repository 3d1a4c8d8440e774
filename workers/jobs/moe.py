"""RQ job: build a mixture-of-experts model from dense experts and register it, the experts as parents."""

from __future__ import annotations

from typing import Any

from workers.jobs.context import JobContext
from workers.jobs.publish import publish_model
from workers.moe.build import build_moe
from workers.moe.config import MoeConfig
from workers.store.references import resolve_model


def moe_job(spec: dict[str, Any]) -> dict[str, Any]:
    ctx = JobContext.current()
    config = MoeConfig.model_validate({k: v for k, v in spec.items() if k != "kind"})
    s = ctx.settings
    paths = {
        ref: resolve_model(ref, ctx.registry, s.models_dir, s.import_roots) for ref in config.input_models
    }
    model_id = config.name or f"moe-{ctx.job.id[:8]}"
    outcome = {}

    def build(out_dir) -> None:
        outcome["result"] = build_moe(
            config, paths, out_dir, max_shard_bytes=s.max_shard_bytes, progress=ctx.progress
        )

    record = publish_model(ctx, model_id, build, parents=config.input_models, recipe=spec)
    result = outcome["result"]
    return {
        "model": record.id,
        "architecture": record.architecture,
        "num_experts": result.num_experts,
        "tensors": result.tensors,
        "bytes_written": result.bytes_written,
        "moe_seconds": round(result.seconds, 3),
        "device": result.device,
    }
