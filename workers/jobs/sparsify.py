"""RQ job: sparsify a fine-tune's delta against its base (DARE or magnitude) and report what it cost."""

from __future__ import annotations

import shutil
from typing import Any

from workers.jobs.context import JobContext
from workers.jobs.models import LazyTensors, heldout_perplexity, load_model
from workers.jobs.publish import publish_model
from workers.merge.executor import copy_tokenizer
from workers.sparsify.delta import DARE_SAFE_DELTA, sparsify
from workers.store.model_files import contained
from workers.store.references import resolve_model
from workers.tensors.safetensors_io import PlannedTensor, ShardedWriter, TensorReader


def sparsify_job(spec: dict[str, Any]) -> dict[str, Any]:
    ctx = JobContext.current()
    s = ctx.settings
    tuned_dir = resolve_model(spec["model"], ctx.registry, s.models_dir, s.import_roots)
    base_dir = resolve_model(spec["base"], ctx.registry, s.models_dir, s.import_roots)
    report: dict[str, Any] = {}

    def build(out_dir) -> None:
        with TensorReader(base_dir) as base, TensorReader(tuned_dir) as tuned:
            result = sparsify(
                LazyTensors(base),
                LazyTensors(tuned),
                spec["method"],
                spec["density"],
                spec["seed"],
                ctx.progress,
            )
            plan = [PlannedTensor(n, e.dtype, e.shape) for n, e in tuned.entries.items()]
        writer = ShardedWriter(out_dir, plan, s.max_shard_bytes)
        for item in plan:
            writer.write(item.name, result.tensors[item.name])
        writer.close()
        shutil.copyfile(contained(tuned_dir, "config.json"), out_dir / "config.json")
        copy_tokenizer(tuned_dir, out_dir)
        stats = result.stats
        report.update(
            kept_fraction=round(stats.kept_fraction, 6),
            delta_abs={
                "mean": stats.abs_mean,
                "median": stats.abs_median,
                "p99": stats.abs_p99,
                "max": stats.abs_max,
            },
        )
        if stats.large_deltas:
            report["warning"] = (
                f"deltas are large for DARE: p99 |delta| = {stats.abs_p99:.4g} > {DARE_SAFE_DELTA} "
                "(the DARE paper's condition); expect a quality loss, or use method=magnitude"
            )
        if spec["evaluate"]:
            ctx.progress(0, 1, "held-out perplexity")
            report["perplexity"] = {
                "before": heldout_perplexity(*load_model(tuned_dir)),
                "after": heldout_perplexity(*load_model(out_dir)),
            }

    record = publish_model(ctx, spec["name"], build, parents=[spec["model"], spec["base"]], recipe=spec)
    return {"model": record.id, **report}
