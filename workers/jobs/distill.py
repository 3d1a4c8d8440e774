"""RQ job: distilling step-by-step (workers/distill/pipeline.py) into a new registered model, with the
held-out evaluation of the student, its baselines and the teacher in the result and in the record.

Progress is per phase (teacher queries 0-30 %, training 30-90 %, evaluation 90-100 %), each phase change
also kept as an event. Teacher answers are cached under <home>/distill-cache/ by the teacher's identity
and prompt, so a retried job (the same request again) does not ask the teacher again. Nothing is
registered unless every phase completes."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from workers.distill.pipeline import DistillOptions, distill_step_by_step
from workers.distill.records import TaskSpec, check_records, read_distill_jsonl
from workers.distill.teacher import AnswerCache, endpoint_for, endpoint_teacher, engine_teacher
from workers.jobs.context import JobContext
from workers.jobs.models import load_model
from workers.jobs.publish import publish_model
from workers.store.files import FILE_ID, FileStore
from workers.store.references import resolve_model, resolve_path
from workers.train.data import DataError

REPORT_FILE = "distill.json"
CACHE_DIR = "distill-cache"


def distill_data(
    ref: str, files: FileStore, import_roots: list[Path], task: TaskSpec
) -> tuple[list[dict[str, str]], dict[str, Any]]:
    """The records of an uploaded file (purpose "distill") or of a JSONL path under an import root, each
    checked against the task, and what the lineage records of them."""
    if FILE_ID.match(ref):
        stored = files.get(ref)
        if stored.purpose != "distill":
            raise DataError(
                f"{ref} was uploaded for {stored.purpose!r}; upload distill records with purpose 'distill'"
            )
        records = check_records(files.records(ref), task)
        return records, {"file": ref, "filename": stored.filename, "sha256": stored.sha256}
    path = resolve_path(ref, import_roots, directory=False)
    records = read_distill_jsonl(path, task)
    return records, {"path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


PHASES = {"teacher": (0.0, 0.3), "evaluation": (0.9, 1.0)}


def _span(phase: str) -> tuple[float, float]:
    found = re.search(r"\((\d+)/(\d+)\)", phase)
    if phase.startswith("training") and found:
        index, runs = int(found.group(1)), int(found.group(2))
        return 0.3 + 0.6 * (index - 1) / runs, 0.3 + 0.6 * index / runs
    return PHASES.get(phase, (0.0, 1.0))


def distill_job(spec: dict[str, Any]) -> dict[str, Any]:
    ctx = JobContext.current()
    s = ctx.settings
    source = resolve_model(spec["student"], ctx.registry, s.models_dir, s.import_roots)
    task = TaskSpec.model_validate(spec.get("task") or {})
    options = DistillOptions.model_validate({k: spec[k] for k in DistillOptions.model_fields if k in spec})
    files = FileStore(s.files_dir, s.max_file_bytes)
    ctx.event("Reading the training and evaluation records")
    train_records, train_source = distill_data(spec["train_file"], files, s.import_roots, task)
    eval_records, eval_source = distill_data(spec["eval_file"], files, s.import_roots, task)

    teacher = spec["teacher"]
    complete, teacher_id, parents = None, "data", [spec["student"]]
    if isinstance(teacher, dict) and "endpoint" in teacher:
        endpoint = endpoint_for(teacher["endpoint"], s.teacher_endpoints, s.teacher_hosts)
        complete = endpoint_teacher(endpoint, teacher["model"], options.teacher_max_new_tokens)
        teacher_id = f"endpoint:{endpoint.url}:{teacher['model']}"
    elif isinstance(teacher, dict):
        path = resolve_model(teacher["model"], ctx.registry, s.models_dir, s.import_roots)
        model, tokenizer = load_model(path)
        complete = engine_teacher(model, tokenizer, teacher.get("depth"), options.teacher_max_new_tokens)
        registered = ctx.registry.get(teacher["model"])  # its files' digests name exactly these weights
        weights = json.dumps(registered.files if registered else str(path), sort_keys=True)
        digest = hashlib.sha256(weights.encode()).hexdigest()[:16]
        teacher_id = f"model:{teacher['model']}:{digest}:depth={teacher.get('depth')}"
        parents.append(teacher["model"])
    cache_name = hashlib.sha256(teacher_id.encode()).hexdigest()[:24]
    cache = AnswerCache(s.home / CACHE_DIR / f"{cache_name}.jsonl")
    seen: set[str] = set()

    def report(phase: str, done: int, total: int, message: str) -> None:
        start, end = _span(phase)
        fraction = done / total if total else 1.0
        ctx.progress(round((start + (end - start) * fraction) * 10_000), 10_000, f"{phase}: {message}")
        if phase not in seen:
            seen.add(phase)
            ctx.event(f"{phase}: {message}")

    evaluation: dict[str, Any] = {}  # filled by build; the record is made from it after build returns
    outcome: dict[str, Any] = {}

    def build(out_dir: Path) -> None:
        result = distill_step_by_step(
            lambda: load_model(source),
            train_records,
            eval_records,
            task,
            options,
            teacher=complete,
            teacher_id=teacher_id,
            cache=cache,
            out_dir=out_dir,
            report=report,
            should_stop=ctx.cancel_requested,
        )
        evaluation.update(result["eval"])
        outcome.update(result)
        (out_dir / REPORT_FILE).write_text(json.dumps(result, indent=2))
        ctx.note("saving the distilled student")

    recipe = {k: v for k, v in spec.items() if k != "name"}
    recipe["data"] = {"train": train_source, "eval": eval_source}
    record = publish_model(ctx, spec["name"], build, parents=parents, recipe=recipe, eval=evaluation)
    summary = ", ".join(f"{k} {v['accuracy']:.3f}" for k, v in evaluation.items())
    ctx.event(f"New distilled model created: {record.id} (held-out accuracy: {summary})")
    return {"model": record.id, **outcome}
