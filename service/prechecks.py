"""Checks made before a job is queued, so a bad request fails now with a 4xx, not later in a worker."""

from __future__ import annotations

from pathlib import Path

from fastapi import HTTPException

from service.schemas import MergeJobRequest, VariantsJobRequest
from service.settings import Settings
from workers.merge.homology import HomologyError, check_homologous
from workers.store.references import ModelReferenceError, resolve_model
from workers.store.registry import Registry


def resolve_or_422(ref: str, registry: Registry, settings: Settings) -> Path:
    try:
        return resolve_model(ref, registry, settings.models_dir, settings.import_roots)
    except ModelReferenceError as e:
        raise HTTPException(422, str(e)) from e


def ensure_free(model_id: str, registry: Registry) -> None:
    if registry.exists(model_id):
        raise HTTPException(409, f"model {model_id!r} already exists; choose another name or delete it first")


def check_merge(request: MergeJobRequest, registry: Registry, settings: Settings) -> None:
    paths = {ref: resolve_or_422(ref, registry, settings) for ref in request.input_models}
    try:
        check_homologous(paths)
    except HomologyError as e:
        raise HTTPException(422, f"models are not homologous: {e}") from e
    if request.name:
        ensure_free(request.name, registry)


def check_variants(request: VariantsJobRequest, registry: Registry, settings: Settings) -> None:
    resolve_or_422(request.base, registry, settings)
    if request.prefix is None:
        request.prefix = f"{request.base.rstrip('/').rsplit('/', 1)[-1]}-variant"
    for model_id in request.output_ids:
        ensure_free(model_id, registry)


PRECHECKS = {"merge": check_merge, "variants": check_variants}
