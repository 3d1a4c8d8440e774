"""RQ job: measure a model's per-depth latency and quality on this worker's hardware, store it."""

from __future__ import annotations

from typing import Any

from workers.eval.eval_text import EvalText, resolve_eval_text
from workers.eval.heldout import DEFAULT_EVAL_TEXT, heldout_texts
from workers.generation.profiler import ModelProfile, Progress, profile_model
from workers.inference.protocol import latency_key
from workers.inference.worker import load_engine
from workers.jobs.context import JobContext
from workers.store.delta_only import full_model_dir
from workers.store.file_manifest import verify_files
from workers.store.files import FileStore
from workers.store.references import UnknownModelError
from workers.threads import serving_threads

PROFILING_LOCK_PREFIX = "strata:profiling:"  # + model id: a background profile is queued or running
USER_EVAL_TEXT = "eval_text.txt"  # the user's evaluation text, kept in the model's directory


def designated_texts(
    ctx: JobContext, model_id: str, given: EvalText | None, also: tuple[str, ...] = ()
) -> list[EvalText]:
    """The evaluation texts of a profile, the designated one first: the text given, else the model's
    designated text of its last profile (a user's text is kept beside the model), else the broad held-out;
    the broad held-out and the bundled texts named in `also` are measured too."""
    record = ctx.registry.get(model_id)
    kept = ctx.store.path(model_id) / USER_EVAL_TEXT
    previous = ((record.profile if record else None) or {}).get("eval_text")
    if given is None and previous in heldout_texts():
        given = resolve_eval_text({"name": previous}, [])
    elif given is None and previous and kept.is_file():
        given = EvalText(previous, kept.read_text(encoding="utf-8"), "file")
    texts = [given] if given is not None else []
    for name in (DEFAULT_EVAL_TEXT, *also):
        if name not in {t.name for t in texts}:
            texts.append(resolve_eval_text({"name": name}, []))
    return texts


def profile_and_store(
    ctx: JobContext,
    model_id: str,
    progress: Progress | None = None,
    eval_text: EvalText | None = None,
    also: tuple[str, ...] = (),
    **options: Any,
) -> ModelProfile:
    """Profile a registered model (quality with and without its exit adapters, when it has some, on its
    evaluation texts), store the profile in its registry record and its latency model where the API reads
    it; a user's designated text is kept beside the model for later profiles."""
    record = ctx.registry.get(model_id)
    if record is None:
        raise UnknownModelError(f"model {model_id!r} is not registered")
    verify_files(model_id, ctx.store.path(model_id), record.files)
    texts = designated_texts(ctx, model_id, eval_text, also)
    weights = full_model_dir(ctx.settings.models_dir, model_id)  # a delta alone: materialised
    engine = load_engine(weights, precision=ctx.settings.infer_precision)  # as served
    profile = profile_model(
        engine,
        model_name=model_id,
        progress=progress,
        eval_texts=texts,
        latency_threads=serving_threads(),  # timed as inference decodes, whatever this worker runs on
        **options,
    )
    if texts[0].source != "bundled" and texts[0] is eval_text:
        kept = ctx.store.path(model_id) / USER_EVAL_TEXT
        partial = kept.with_suffix(".partial")
        partial.write_text(texts[0].text, encoding="utf-8")
        partial.replace(kept)
    record = ctx.registry.get(model_id) or record
    record.profile = profile.model_dump(mode="json")
    if not ctx.registry.update(record):  # deleted meanwhile: never re-register it as a ghost
        raise UnknownModelError(f"model {model_id!r} was deleted while it was profiled")
    ctx.redis.set(latency_key(model_id), profile.latency.model_dump_json())
    return profile


def profile_job(spec: dict[str, Any]) -> dict[str, Any]:
    ctx = JobContext.current()
    model_id = spec["model"]
    try:
        return _profile(ctx, spec, model_id)
    finally:
        ctx.redis.delete(PROFILING_LOCK_PREFIX + model_id)


def _profile(ctx: JobContext, spec: dict[str, Any], model_id: str) -> dict[str, Any]:
    record = ctx.registry.get(model_id)
    if spec.get("if_unprofiled") and record is not None and record.profile:
        return {"model": model_id, "skipped": "the model has a profile already"}

    def progress(message: str, fraction: float) -> None:
        ctx.progress(int(fraction * 1000), 1000, message)

    given = spec.get("eval_text")
    files = FileStore(ctx.settings.files_dir, ctx.settings.max_file_bytes)
    eval_text = resolve_eval_text(given, ctx.settings.import_roots, files) if given else None
    profile = profile_and_store(
        ctx,
        model_id,
        progress,
        eval_text,
        grid=spec.get("grid"),
        prompt_lengths=tuple(spec.get("prompt_lengths", (16, 96))),
        decode_tokens=spec.get("decode_tokens", 8),
        repeats=spec.get("repeats", 2),
    )
    texts = {name: {"tokens": q.tokens, "source": q.source} for name, q in profile.quality_by_text.items()}
    return {
        "model": model_id,
        "device": profile.device,
        "grid": profile.grid,
        "eval_text": profile.eval_text,
        "texts": texts,
    }
