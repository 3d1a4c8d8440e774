"""RQ job: prune a model to a target architecture, with held-out perplexity before and after, against a
random selection at the same target, and after optional distillation healing."""

from __future__ import annotations

from typing import Any

from workers.eval.texts import calibration_windows, instruction_windows
from workers.jobs.context import JobContext
from workers.jobs.models import heldout_perplexity, load_model, save_model
from workers.jobs.publish import publish_model
from workers.prune.heal import heal
from workers.prune.prune import prune
from workers.prune.target import PruneTarget
from workers.store.references import resolve_model


def prune_job(spec: dict[str, Any]) -> dict[str, Any]:
    ctx = JobContext.current()
    s = ctx.settings
    source_dir = resolve_model(spec["model"], ctx.registry, s.models_dir, s.import_roots)
    target = PruneTarget.model_validate(spec["target"])
    report: dict[str, Any] = {}

    def build(out_dir) -> None:
        model, tokenizer = load_model(source_dir)
        calibration = calibration_windows(tokenizer, spec["seq_len"], spec["calibration_windows"])
        healing = dict(spec.get("heal") or {})
        prune_end = 0.4 if healing else 0.8
        result = prune(
            model, target, calibration, spec["mode"], spec["seed"], ctx.phase(0, prune_end, "pruning")
        )
        ctx.progress(round(prune_end * 100), 100, "measuring held-out perplexity", force=True)
        ppl = {
            "source": heldout_perplexity(model, tokenizer),
            "pruned": heldout_perplexity(result.model, tokenizer),
        }
        if spec["compare_random"] and spec["mode"] != "random":
            baseline = prune(model, target, calibration, "random", spec["seed"])
            ppl["random"] = heldout_perplexity(baseline.model, tokenizer)
        if healing:
            data = healing.pop("data", "calibration")
            texts = instruction_windows(tokenizer, spec["seq_len"]) if data == "instructions" else calibration
            healed = heal(result.model, model, texts, progress=ctx.phase(0.5, 0.9, "healing"), **healing)
            ctx.progress(90, 100, "measuring held-out perplexity after healing", force=True)
            ppl["healed"] = heldout_perplexity(result.model, tokenizer)
            report["heal"] = {
                "steps": healed.steps,
                "kd_before": healed.kd_before,
                "kd_after": healed.kd_after,
            }
        report.update(
            config=result.plan.model_dump(),
            source_parameters=result.source_params,
            removed_fraction=round(result.removed_fraction, 6),
            removed_layers=result.removed_layers,
            perplexity=ppl,
        )
        ctx.progress(95, 100, "saving the pruned model", force=True)
        save_model(result.model, tokenizer, out_dir)

    record = publish_model(ctx, spec["name"], build, parents=[spec["model"]], recipe=spec)
    return {"model": record.id, **report}
