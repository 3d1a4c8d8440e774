"""RQ job: supervised fine-tuning (full or LoRA) of a registered model on an uploaded file, a JSONL file
under an import root, or inline records; the output is registered with its lineage (parent, data digest,
recipe). Each step's loss is kept as an event (job meta `events`; /v1/fine_tuning/jobs/{id}/events)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from workers.jobs.as_delta import DEFAULT_BUDGET, delta_base_dir, describer, store_as_delta
from workers.jobs.context import JobContext
from workers.jobs.models import load_model
from workers.jobs.publish import publish_model
from workers.store.files import FileStore
from workers.store.references import resolve_model, resolve_path
from workers.train.data import read_jsonl
from workers.train.finetune import ADAPTER_DIR, FinetuneConfig, finetune_model
from workers.train.trainer import StepInfo


def training_data(
    spec: dict[str, Any], files: FileStore, import_roots: list[Path], prefix: str = "training"
) -> tuple[list[dict[str, Any]], dict[str, Any]] | None:
    """The records of `<prefix>_file` (an uploaded file id), `data` (a JSONL path) or `examples`, and
    what the lineage records of them (source and sha256 of the content); None when none is given."""
    file_id = spec.get(f"{prefix}_file")
    if file_id:
        record = files.get(file_id)
        source = {"file": file_id, "filename": record.filename, "sha256": record.sha256}
        return files.records(file_id), source
    if prefix != "training":
        return None
    if spec.get("data"):
        path = resolve_path(spec["data"], import_roots, directory=False)
        source = {"path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
        return read_jsonl(path), source
    if spec.get("examples"):
        digest = hashlib.sha256(json.dumps(spec["examples"], sort_keys=True).encode()).hexdigest()
        return spec["examples"], {"inline": True, "sha256": digest}
    return None


def finetune_job(spec: dict[str, Any]) -> dict[str, Any]:
    ctx = JobContext.current()
    s = ctx.settings
    source = resolve_model(spec["model"], ctx.registry, s.models_dir, s.import_roots)
    files = FileStore(s.files_dir, s.max_file_bytes)
    ctx.event("Validating training file")
    found = training_data(spec, files, s.import_roots)
    if found is None:
        raise ValueError("no training data: give training_file, data or examples")
    records, data = found
    validation = training_data(spec, files, s.import_roots, prefix="validation")
    config = FinetuneConfig.model_validate({k: spec[k] for k in FinetuneConfig.model_fields if k in spec})
    report: dict[str, Any] = {}
    # stored as the base + a compressed delta (served over it), as the variants job stores its variants
    budget = spec.get("delta_error_budget", DEFAULT_BUDGET)
    base_dir = delta_base_dir(ctx, spec["model"], budget)

    def progress(info: StepInfo) -> None:
        shown = f"Step {info.step}/{info.total}: training loss={info.loss:.4f}"
        if info.val_loss is not None:
            shown += f", validation loss={info.val_loss:.4f}"
        metrics = {"step": info.step, "total_steps": info.total, "train_loss": round(info.loss, 5)}
        if info.val_loss is not None:
            metrics["valid_loss"] = round(info.val_loss, 5)
        ctx.progress(info.step, info.total + max(1, info.total // 20), shown, force=True)
        ctx.event(shown, data=metrics)

    def build(out_dir: Path) -> None:
        model, tokenizer = load_model(source)
        ctx.event(f"Fine-tuning job started ({config.method}, {len(records)} records)")
        trained = finetune_model(
            model,
            tokenizer,
            out_dir,
            records,
            config,
            validation=validation[0] if validation else None,
            progress=progress,
            should_stop=ctx.cancel_requested,
        )
        report.update(trained.model_dump(mode="json"))
        if trained.truncated:
            cut = f"{trained.truncated} records were longer than {config.max_length} tokens and were cut"
            ctx.event(cut, level="warn")
        ctx.note("saving the fine-tuned model")
        if base_dir is not None and budget is not None:
            store_as_delta(ctx, spec["model"], base_dir, out_dir, budget)

    recipe = {k: v for k, v in spec.items() if k not in ("examples", "name")}
    recipe["data"] = data
    if validation:
        recipe["validation_data"] = validation[1]
    describe = describer(base_dir, spec.get("keep_full_weights", False))
    record = publish_model(
        ctx, spec["name"], build, parents=[spec["model"]], recipe=recipe, describe_with=describe
    )
    ctx.event(f"New fine-tuned model created: {record.id}")
    out = {"model": record.id, **report}
    if config.method == "lora":
        out["adapter"] = ADAPTER_DIR
    return out
