"""RQ job: prune a model to a target architecture, with held-out perplexity before and after, against a
random selection at the same target, and after optional distillation healing. With `replace`, depth is cut
by block replacement and the report also holds plain layer removal at the same target, healed the same way.
mode "learned" learns the masks on the heal data (LLM-Shearing); healing over `domains` (optionally with
dynamic batch loading) reports the domain weights over time and each domain's loss gap to the source."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from workers.eval.texts import answer_windows, calibration_windows, instruction_windows
from workers.jobs.context import JobContext
from workers.jobs.models import heldout_perplexity, load_model, save_model
from workers.jobs.publish import publish_model
from workers.prune.heal import cycled, heal
from workers.prune.prune import prune
from workers.prune.replace import FitOptions
from workers.prune.shear import MaskOptions, shape_of_model
from workers.prune.target import PruneTarget
from workers.prune.width import attention_shape
from workers.store.model_files import read_config
from workers.store.references import resolve_model, resolve_path
from workers.train.domains import DEFAULT_DOMAINS, load_domains
from workers.train.dynamic_batches import ETA, DomainSampler, domain_losses, dynamic_loading


def target_of(spec_target: dict[str, Any], source_dir: Path, ctx: JobContext) -> PruneTarget:
    """The PruneTarget of a request's target: its sizes, or those of its target_model's config."""
    if not spec_target.get("target_model"):
        return PruneTarget.model_validate({k: v for k, v in spec_target.items() if k != "target_model"})
    s = ctx.settings
    other = resolve_model(spec_target["target_model"], ctx.registry, s.models_dir, s.import_roots)
    return PruneTarget.model_validate(shape_of_model(read_config(source_dir), read_config(other)))


def domain_sources(healing: dict[str, Any], import_roots: list[Path]) -> dict[str, Path | None]:
    """name -> JSONL path (None: the bundled text of that name) of the heal's domains (default: all five)."""
    sources: dict[str, Path | None] = {}
    for item in healing.get("domains") or DEFAULT_DOMAINS:
        if isinstance(item, str):
            sources[item] = None
        else:
            path = item.get("path")
            sources[item["name"]] = resolve_path(path, import_roots, directory=False) if path else None
    return sources


def prune_job(spec: dict[str, Any]) -> dict[str, Any]:
    ctx = JobContext.current()
    s = ctx.settings
    source_dir = resolve_model(spec["model"], ctx.registry, s.models_dir, s.import_roots)
    target = target_of(spec["target"], source_dir, ctx)
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
        dbl = bool(healing.pop("dynamic_batch_loading", False))
        update_every = healing.pop("update_every", 10)
        eta = healing.pop("eta", ETA)
        heldout = healing.pop("heldout_windows", 4)
        domain_specs = healing.pop("domains", None)
        domains = None
        if healing and (dbl or domain_specs):
            sources = domain_sources({"domains": domain_specs}, s.import_roots)
            mask_steps = (spec.get("masks") or {}).get("steps", 40) if mode == "learned" else 0
            windows = healing.get("steps", 30) + mask_steps + 2 * heldout + 1  # enough never to cycle
            domains = load_domains(tokenizer, sources, spec["seq_len"], heldout, windows * spec["seq_len"])
        weights = [1.0 if isinstance(d, str) else d.get("weight", 1.0) for d in domain_specs or []] or None
        mask_options = MaskOptions.model_validate({"seq_len": spec["seq_len"], **(spec.get("masks") or {})})
        stream = None
        if mode == "learned" and domains is not None:  # the mask phase trains on the heal data, a fixed mix
            stream = DomainSampler(domains, weights or [1.0] * len(domains), mask_options.batch_size, seed)
        elif mode == "learned" and healing:
            stream = cycled(windows_of(healing.get("data", "calibration")))
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
            stream,
            mask_options,
        )
        ctx.progress(round(prune_end * 100), 100, "measuring held-out perplexity", force=True)
        ppl = {
            "source": heldout_perplexity(model, tokenizer),
            "pruned": heldout_perplexity(result.model, tokenizer),
        }
        cuts_within = result.plan.hidden_size not in (None, model.config.hidden_size) or (
            result.plan.num_attention_heads != result.plan.num_key_value_heads * attention_shape(model)[1]
        )
        if spec["compare_random"] and mode != "random" and not cuts_within:
            random_progress = ctx.phase(prune_end, prune_end + 0.05, "random baseline")
            random_target = target
            if mode == "learned":  # the learned shape's sizes, planned or given
                random_target = PruneTarget(
                    num_hidden_layers=result.plan.num_hidden_layers,
                    intermediate_size=result.plan.intermediate_size,
                    num_key_value_heads=result.plan.num_key_value_heads,
                )
            baseline = prune(
                model,
                random_target,
                calibration,
                "random",
                seed,
                random_progress,
                fit_options,
                fitting,
                masks,
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
            loading = None
            if domains is not None:
                ctx.progress(50, 100, "reference losses of the source on each domain", force=True)
                loading = dynamic_loading(
                    result.model, model, domains, weights, 1, update_every if dbl else None, seed, eta
                )
                texts = [w.view(1, -1) for d in domains for w in d.dev]
            healed = heal(
                result.model,
                model,
                texts,
                progress=ctx.phase(0.5, heal_end, "healing"),
                loading=loading,
                **healing,
            )
            ctx.progress(
                round(heal_end * 100), 100, "measuring held-out perplexity after healing", force=True
            )
            ppl["healed"] = heldout_perplexity(result.model, tokenizer)
            report["heal"] = {
                "steps": healed.steps,
                "kd_before": healed.kd_before,
                "kd_after": healed.kd_after,
            }
            if loading is not None and domains is not None:
                test = {d.name: d.test for d in domains}
                after, reference = domain_losses(result.model, test), domain_losses(model, test)
                report["heal"].update(
                    dynamic_batch_loading=dbl,
                    eta=loading.eta,
                    domain_weights=loading.history,
                    loss_gap={name: round(after[name] - reference[name], 5) for name in after},
                    domain_perplexity={name: round(math.exp(v), 4) for name, v in after.items()},
                )
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
        if result.masks is not None:
            report["masks"] = {
                "steps": result.masks.steps,
                "seconds": round(result.masks.seconds, 2),
                "expected": result.masks.expected,
                "target": result.masks.target,
                "multipliers": result.masks.multipliers,
            }
        report.update(
            config=result.plan.model_dump(exclude_none=True),
            source_parameters=result.source_params,
            removed_fraction=round(result.removed_fraction, 6),
            removed_layers=result.removed_layers,
            perplexity=ppl,
        )
        ctx.progress(95, 100, "saving the pruned model", force=True)
        save_model(result.model, tokenizer, out_dir)

    record = publish_model(ctx, spec["name"], build, parents=[spec["model"]], recipe=spec)
    return {"model": record.id, **report}
