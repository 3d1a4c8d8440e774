"""RQ job: derive fine-tune-like variants of a registered model (see workers.variants)."""

from __future__ import annotations

from typing import Any

from workers.jobs.as_delta import delta_base_dir, describer
from workers.jobs.context import JobContext
from workers.jobs.publish import publish_model
from workers.store.references import resolve_model
from workers.variants import make_variant
from workers.variants_delta import compress_variant


def variants_job(spec: dict[str, Any]) -> dict[str, Any]:
    ctx = JobContext.current()
    s = ctx.settings
    source = resolve_model(spec["base"], ctx.registry, s.models_dir, s.import_roots)
    count = spec["count"]
    budget = spec.get("delta_error_budget")
    base_dir = delta_base_dir(ctx, spec["base"], budget)  # served as the base + a delta
    describe = describer(base_dir, spec.get("keep_full_weights", False))
    created = []
    for i in range(count):
        model_id = f"{spec['prefix']}-{i + 1}"

        def progress(done: int, total: int, message: str, i: int = i) -> None:
            ctx.progress(i * total + done, count * total, f"variant {i + 1}/{count}: {message}")

        def build(out_dir, i: int = i, progress=progress) -> None:
            make_variant(
                source,
                out_dir,
                seed=spec["seed"] + i,
                scale=spec["scale"],
                rank=spec.get("rank"),
                max_shard_bytes=s.max_shard_bytes,
                progress=progress,
            )
            if base_dir is not None and budget is not None:
                ctx.note(f"variant {i + 1}/{count}: storing its delta to the base")
                compress_variant(source, out_dir, out_dir, base_id=spec["base"], error_budget=budget)

        publish_model(ctx, model_id, build, parents=[spec["base"]], recipe=spec, describe_with=describe)
        created.append(model_id)
    return {"models": created}
