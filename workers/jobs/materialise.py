"""RQ job: a variant stored as its delta alone, written out again as a full model of its own (base + delta,
the weights it is served with), to download, export or hand to other tools."""

from __future__ import annotations

import shutil
from typing import Any

from workers.jobs.context import JobContext
from workers.jobs.publish import publish_model
from workers.store.references import resolve_model


def materialise_job(spec: dict[str, Any]) -> dict[str, Any]:
    ctx = JobContext.current()
    s = ctx.settings
    ctx.note(f"materialising {spec['model']}")
    source = resolve_model(spec["model"], ctx.registry, s.models_dir, s.import_roots)  # base + delta

    def build(out_dir) -> None:
        for item in sorted(source.iterdir()):
            if item.is_file() and not item.is_symlink():
                shutil.copyfile(item, out_dir / item.name)

    record = publish_model(ctx, spec["name"], build, parents=[spec["model"]], recipe=spec)
    return {"model": record.id, "num_parameters": record.num_parameters, "size_bytes": record.size_bytes}
