"""RQ job: prune a model to a target architecture, with held-out perplexity before and after, against a
random selection at the same target, and after optional distillation healing. With `replace`, depth is cut
by block replacement and the report also holds plain layer removal at the same target, healed the same way."""

from __future__ import annotations

from typing import Any

from workers.eval.texts import answer_windows, calibration_windows, instruction_windows
from workers.jobs.context import JobContext
from workers.jobs.models import heldout_perplexity, load_model, save_model
from workers.jobs.publish import publish_model
from workers.prune.heal import heal
from workers.prune.prune import prune
from workers.prune.replace import FitOptions
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

        def windows_of(data: str):
            if data == "answers":
                return answer_windows(tokenizer, spec["seq_len"])[0]
            return instruction_windows(tokenizer, spec["seq_len"]) if data == "instructions" else calibration

        replace = dict(spec.get("replace") or {})
        fit_options = (
            FitOptions.model_validate({k: v for k, v in replace.items() if k in FitOptions.model_fields})
            if replace
            else None
        )
        fitting, masks = None, None
        if replace and replace.get("data", "answers") == "answers":
            fitting, masks = answer_windows(tokenizer, spec["seq_len"])
        elif replace:
            fitting = windows_of(replace["data"])
        mode, seed = spec["mode"], spec["seed"]
        healing = dict(spec.get("heal") or {})
        compare_removal = bool(replace) and replace.get("compare_removal", True)
        # phases on the job's 0..1: pruning (and the baselines), then healing in 0.5..0.9
        prune_end = 0.4 if healing else 0.8
        result = prune(
            model,
            target,
            calibration,
            mode,
            seed,
            ctx.phase(0, prune_end, "pruning"),
            fit_options,
            fitting,
            masks,
        )
        ctx.progress(round(prune_end * 100), 100, "measuring held-out perplexity", force=True)
        ppl = {
            "source": heldout_perplexity(model, tokenizer),
            "pruned": heldout_perplexity(result.model, tokenizer),
        }
        if spec["compare_random"] and mode != "random":
            random_progress = ctx.phase(prune_end, prune_end + 0.05, "random baseline")
            baseline = prune(
                model, target, calibration, "random", seed, random_progress, fit_options, fitting, masks
            )
            ppl["random"] = heldout_perplexity(baseline.model, tokenizer)
        removal = None
        if compare_removal:
            removal_progress = ctx.phase(prune_end + 0.05, prune_end + 0.1, "plain removal")
            removal = prune(model, target, calibration, mode, seed, removal_progress)
            ppl["removed"] = heldout_perplexity(removal.model, tokenizer)
            report["removed_layers_plain"] = removal.removed_layers
        if healing:
            texts = windows_of(healing.pop("data", "calibration"))
            heal_end = 0.8 if removal is not None else 0.9
            healed = heal(result.model, model, texts, progress=ctx.phase(0.5, heal_end, "healing"), **healing)
            ctx.progress(
                round(heal_end * 100), 100, "measuring held-out perplexity after healing", force=True
            )
            ppl["healed"] = heldout_perplexity(result.model, tokenizer)
            report["heal"] = {
                "steps": healed.steps,
                "kd_before": healed.kd_before,
                "kd_after": healed.kd_after,
            }
            if removal is not None:
                heal(
                    removal.model,
                    model,
                    texts,
                    progress=ctx.phase(0.8, 0.9, "healing plain removal"),
                    **healing,
                )
                ppl["removed_healed"] = heldout_perplexity(removal.model, tokenizer)
        if result.replaced is not None and result.fit is not None:
            report["replaced"] = {
                "block": result.replaced.layers,
                "criterion": fit_options.criterion if fit_options else None,
                "init_layer": result.replaced.init,
                "steps": result.fit.steps,
                "relative_mse_before": result.fit.mse_before,
                "relative_mse_after": result.fit.mse_after,
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
