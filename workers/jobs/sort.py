"""RQ job: Sorted Fine-Tuning (loss averaged over several exits), then a fresh per-exit profile."""

from __future__ import annotations

from typing import Any

from workers.early_exit.adapters import FILENAME, ExitAdapters
from workers.jobs.context import JobContext
from workers.jobs.models import load_model, save_model
from workers.jobs.profile import profile_and_store
from workers.jobs.publish import publish_model
from workers.store.references import resolve_model, resolve_path
from workers.train.data import read_jsonl, shipped_data_path
from workers.train.sorted_ft import SortConfig, train_sorted


def sort_job(spec: dict[str, Any]) -> dict[str, Any]:
    ctx = JobContext.current()
    s = ctx.settings
    source = resolve_model(spec["model"], ctx.registry, s.models_dir, s.import_roots)
    if spec.get("examples"):
        records = spec["examples"]
    elif spec.get("data"):
        records = read_jsonl(resolve_path(spec["data"], s.import_roots, directory=False))
    else:
        records = read_jsonl(shipped_data_path())
    config = SortConfig.model_validate(
        {k: spec[k] for k in SortConfig.model_fields if spec.get(k) is not None}
    )
    report: dict[str, Any] = {}

    def progress(step: int, total: int, losses: dict[int, float]) -> None:
        shown = " ".join(f"{k}:{v:.3f}" for k, v in sorted(losses.items()))
        ctx.progress(step, total + total // 4, f"step {step}/{total} loss per exit {shown}")

    adapters: list[ExitAdapters] = []

    def build(out_dir) -> None:
        model, tokenizer = load_model(source)
        trained = train_sorted(model, tokenizer, records, config, progress)
        report["training"] = trained.model_dump(mode="json", exclude={"loss_curve"})
        model.to("cpu")
        save_model(model, tokenizer, out_dir)
        if trained.adapters is not None:  # stored with the model, so they are published with it
            trained.adapters.save(out_dir, {"recipe": {"trained_with": "sort", "init": config.adapter_init}})
            adapters.append(trained.adapters)

    record = publish_model(ctx, spec["name"], build, parents=[spec["model"]], recipe=spec)
    if adapters:
        record.exit_adapters = {
            "file": FILENAME,
            "exits": adapters[0].depths,
            "recipe": {"trained_with": "sort", "init": config.adapter_init, "lr": config.adapter_lr},
            "data": {"source": "sort training data", "records": len(records)},
            "device": report["training"]["device"],
        }
        ctx.registry.update(record)
    ctx.progress(4, 5, "profiling the exits of the sorted model")
    profile = profile_and_store(ctx, record.id, repeats=1, prompt_lengths=(16, 96), decode_tokens=8)
    quality = {k: q.model_dump() for k, q in profile.quality.items()}
    exits = {"exit_adapters": adapters[0].depths} if adapters else {}
    return {"model": record.id, **report, **exits, "quality": quality}
