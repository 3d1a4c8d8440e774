"""RQ job: grow a model function-preservingly (identity layers, duplicated MLP channels) and check it."""

from __future__ import annotations

from typing import Any

from workers.eval.compare import max_logit_diff
from workers.eval.texts import calibration_windows
from workers.grow.depth import grow_depth
from workers.grow.width import grow_mlp_width
from workers.jobs.context import JobContext
from workers.jobs.models import load_model, save_model
from workers.jobs.publish import publish_model
from workers.store.references import resolve_model


def grow_job(spec: dict[str, Any]) -> dict[str, Any]:
    ctx = JobContext.current()
    s = ctx.settings
    source_dir = resolve_model(spec["model"], ctx.registry, s.models_dir, s.import_roots)
    report: dict[str, Any] = {}

    def build(out_dir) -> None:
        model, tokenizer = load_model(source_dir)
        grown = model
        if spec.get("insert_after"):
            grown = grow_depth(grown, spec["insert_after"])
        if spec.get("intermediate_size"):
            grown = grow_mlp_width(grown, spec["intermediate_size"], spec["seed"])
        ctx.progress(1, 2, "checking the output is unchanged")
        probes = calibration_windows(tokenizer, seq_len=128, max_windows=2)
        report.update(
            num_hidden_layers=grown.config.num_hidden_layers,
            intermediate_size=grown.config.intermediate_size,
            num_parameters=grown.num_parameters(),
            max_logit_diff=max_logit_diff(model, grown, probes),
        )
        save_model(grown, tokenizer, out_dir)

    record = publish_model(ctx, spec["name"], build, parents=[spec["model"]], recipe=spec)
    return {"model": record.id, **report}
