"""RQ job: derive fine-tune-like variants of a registered model (see workers.variants)."""

from __future__ import annotations

from typing import Any

from workers.jobs.context import JobContext
from workers.jobs.publish import publish_model
from workers.store.references import resolve_model
from workers.variants import make_variant


def variants_job(spec: dict[str, Any]) -> dict[str, Any]:
    ctx = JobContext.current()
    s = ctx.settings
    source = resolve_model(spec["base"], ctx.registry, s.models_dir, s.import_roots)
    count = spec["count"]
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

        publish_model(ctx, model_id, build, parents=[spec["base"]], recipe=spec)
        created.append(model_id)
    return {"models": created}
