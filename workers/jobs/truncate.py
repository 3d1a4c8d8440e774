"""RQ job: export the early-exit submodel of depth n (layers 1..n + final norm + head) as a plain HF model."""

from __future__ import annotations

from typing import Any

from workers.jobs.context import JobContext
from workers.jobs.publish import publish_model
from workers.merge.executor import copy_tokenizer
from workers.store.references import resolve_model
from workers.train.truncate import truncate_model


def truncate_job(spec: dict[str, Any]) -> dict[str, Any]:
    ctx = JobContext.current()
    s = ctx.settings
    source = resolve_model(spec["model"], ctx.registry, s.models_dir, s.import_roots)

    def build(out_dir) -> None:
        truncate_model(source, out_dir, spec["num_layers"])
        copy_tokenizer(source, out_dir)

    record = publish_model(ctx, spec["name"], build, parents=[spec["model"]], recipe=spec)
    return {"model": record.id, "num_layers": record.num_layers, "num_parameters": record.num_parameters}
