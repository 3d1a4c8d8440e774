"""Build a model in staging, move it into the store, register it: all or nothing."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from workers.jobs.context import JobContext
from workers.merge.config import MODEL_ID
from workers.store.consistency import register_placed
from workers.store.model_files import shown
from workers.store.model_store import describe
from workers.store.references import is_registry_id
from workers.store.registry import ModelRecord, ParentGoneError
from workers.tensors.finite import first_non_finite


class ModelIdTakenError(ValueError):
    pass


class NonFiniteOutputError(ValueError):
    pass


class InvalidModelIdError(ValueError):
    pass


def publish_model(
    ctx: JobContext,
    model_id: str,
    build: Callable[[Path], Any],
    *,
    parents: list[str],
    recipe: dict[str, Any],
    describe_with: Callable[[Path], dict[str, Any]] = describe,
    **fields: Any,
) -> ModelRecord:
    """Run `build(staging_dir)`; register the result as `model_id` only if it completes, holds only finite
    numbers, and every registered parent is still registered at that moment. `describe_with` reads the
    record's fields from the finished directory; `fields` adds others (type, base_model)."""
    if not MODEL_ID.match(model_id):  # every id, however made, passes the same check
        raise InvalidModelIdError(f"{shown(model_id)} is not a valid model id; nothing was built")
    if ctx.registry.exists(model_id):
        raise ModelIdTakenError(f"model {model_id!r} already exists")
    with ctx.store.staging(model_id) as tmp:
        try:
            build(tmp)
        except Exception as e:  # a parent deleted meanwhile explains it better than a missing file
            gone = [p for p in parents if is_registry_id(p) and not ctx.registry.exists(p)]
            if gone:
                raise ParentGoneError(
                    f"model {gone[0]!r} was deleted while {model_id!r} was built from it; "
                    "nothing was registered"
                ) from e
            raise
        ctx.note("checking the output for NaN and inf")
        bad = first_non_finite(tmp)
        if bad is not None:
            raise NonFiniteOutputError(
                f"tensor {bad!r} of the output holds NaN or infinite values; nothing was registered"
            )
        # described before it moves into place (the rename keeps every file as it is): a failure here
        # leaves nothing in the store
        record = ModelRecord(id=model_id, parents=parents, recipe=recipe, **describe_with(tmp), **fields)
    required = [p for p in parents if is_registry_id(p)]
    if not register_placed(ctx.store, ctx.registry, record, require=required):
        raise ModelIdTakenError(f"model {model_id!r} was registered by another job meanwhile")
    return record
