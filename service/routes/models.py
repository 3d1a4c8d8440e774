"""/v1/models: the registry, in OpenAI's list shape plus Strata metadata."""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException
from fastapi.responses import FileResponse

from service import deps
from service.schemas import (
    ERROR_RESPONSES,
    ImportRequest,
    ModelDeleted,
    ModelFile,
    ModelFileList,
    ModelList,
    ModelObject,
)
from service.template_checks import check_or_422, templates_in
from workers.lora.adapter_delta import AdapterError, adapter_to_delta
from workers.lora.extract import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from workers.settings import Settings
from workers.store.consistency import delete_registered, register_placed
from workers.store.delta_only import describe_stored
from workers.store.loadable import check_loadable
from workers.store.model_files import ModelFileError, copy_contained
from workers.store.model_store import ModelStore, StoreError, describe, describe_adapter
from workers.store.references import ModelReferenceError, resolve_path
from workers.store.registry import BaseInUseError, ModelRecord, ParentGoneError, Registry
from workers.tensors.safetensors_io import DELTA_META, DELTA_WEIGHTS
from workers.variants_delta import DeltaError, compress_variant, describe_delta

router = APIRouter(prefix="/v1/models", tags=["models"], responses=ERROR_RESPONSES)
RegistryDep = Annotated[Registry, Depends(deps.registry)]


def _get(registry: Registry, model_id: str) -> ModelRecord:
    record = registry.get(model_id)
    if record is None:
        raise HTTPException(404, f"model {model_id!r} is not registered")
    return record


@router.get("", response_model=ModelList)
def list_models(registry: RegistryDep) -> ModelList:
    return ModelList(data=[ModelObject.of(r) for r in registry.list()])


@router.get("/{model_id}", response_model=ModelObject)
def get_model(model_id: str, registry: RegistryDep) -> ModelObject:
    return ModelObject.of(_get(registry, model_id))


def _files(store: ModelStore, model_id: str) -> dict[str, Path]:
    """The regular files directly in the model's directory (no links, no subdirectories)."""
    directory = store.path(model_id)
    if not directory.is_dir():
        return {}
    return {p.name: p for p in sorted(directory.iterdir()) if p.is_file() and not p.is_symlink()}


@router.get("/{model_id}/files", response_model=ModelFileList)
def list_files(
    model_id: str, registry: RegistryDep, store: Annotated[ModelStore, Depends(deps.store)]
) -> ModelFileList:
    """The files of a model or adapter (weights, config, tokenizer), to download one by one."""
    _get(registry, model_id)
    files = _files(store, model_id)
    return ModelFileList(data=[ModelFile(name=n, size_bytes=p.stat().st_size) for n, p in files.items()])


@router.get(
    "/{model_id}/files/{filename}",
    response_class=FileResponse,
    responses={200: {"content": {"application/octet-stream": {}}, "description": "The file's bytes"}},
)
def download_file(
    model_id: str, filename: str, registry: RegistryDep, store: Annotated[ModelStore, Depends(deps.store)]
) -> FileResponse:
    _get(registry, model_id)
    files = _files(store, model_id)
    if filename not in files:
        raise HTTPException(404, f"model {model_id!r} has no file {filename!r} (see its /files)")
    return FileResponse(files[filename], filename=filename, media_type="application/octet-stream")


@router.delete("/{model_id}", response_model=ModelDeleted)
def delete_model(
    model_id: str, registry: RegistryDep, store: Annotated[ModelStore, Depends(deps.store)]
) -> ModelDeleted:
    _get(registry, model_id)
    try:
        delete_registered(store, registry, model_id)
    except StoreError as e:
        raise HTTPException(503, f"cannot delete model {model_id!r}: {e.strerror}") from e
    except BaseInUseError as e:
        raise HTTPException(409, str(e)) from e
    return ModelDeleted(id=model_id)


@router.post("/import", response_model=ModelObject, status_code=201)
def import_model(
    body: ImportRequest,
    registry: RegistryDep,
    store: Annotated[ModelStore, Depends(deps.store)],
    settings: Annotated[Settings, Depends(deps.settings)],
) -> ModelObject:
    """Copy a local HF directory into the store (never linked: the store shares no file with the import
    root) and register it with what its files were. With `base` (a registered model): a full model is
    stored as that base + a compressed delta and served over it; a PEFT LoRA adapter directory
    (adapter_config.json + adapter_model.safetensors) is served over it without merging."""
    if registry.exists(body.id):
        raise HTTPException(409, f"model {body.id!r} already exists")
    base = _import_base(body, registry, store)
    adapter = base is not None and Path(body.path, ADAPTER_CONFIG).exists()
    try:
        if adapter:
            source = resolve_path(
                str(Path(body.path, ADAPTER_CONFIG)), settings.import_roots, directory=False
            ).parent
        else:
            source = resolve_path(body.path, settings.import_roots)
    except ModelReferenceError as e:
        raise HTTPException(422, str(e)) from e
    fields: dict = {}
    try:
        with store.staging(body.id) as tmp:
            for item in source.iterdir():
                if (
                    item.is_file()
                    and not item.is_symlink()
                    and item.suffix not in (".bin", ".pt", ".pth", ".pkl")
                    and (not adapter or item.name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS))
                    and item.name not in (DELTA_WEIGHTS, DELTA_META)  # Strata writes these itself
                ):
                    copy_contained(source, item.name, tmp / item.name)
            if adapter:
                assert base is not None
                adapter_to_delta(tmp, store.path(base.id), tmp, base_id=base.id)
                info = describe_adapter(tmp, base.architecture, base.num_layers)
                fields = {"type": "adapter", **describe_delta(tmp)}
            else:
                info = describe(tmp)
                check_loadable(tmp)
                if base is not None:
                    budget = body.delta_error_budget
                    compress_variant(store.path(base.id), tmp, tmp, base_id=base.id, error_budget=budget)
                    info = describe_stored(tmp, store.path(base.id), body.keep_full_weights)
            for template in templates_in(tmp):  # before it is registered, not when a request first uses it
                check_or_422(template, f"cannot import {body.path}")
    except FileExistsError as e:
        raise HTTPException(409, str(e)) from e
    except StoreError as e:
        raise HTTPException(503, f"cannot import {body.path}: {e.strerror}") from e
    except (AdapterError, DeltaError) as e:
        raise HTTPException(422, f"cannot import {body.path} over {body.base!r}: {e}") from e
    except ModelFileError as e:  # names the file or tensor, relative to the model directory
        raise HTTPException(422, f"cannot import {body.path}: {e}") from e
    except OSError as e:  # no path in the message: it would show the store's staging directory
        if e.errno == errno.ENOSPC:
            raise HTTPException(507, f"cannot import {body.path}: the store's disk is full") from e
        raise HTTPException(422, f"cannot import {body.path}: {e.strerror or 'a file cannot be read'}") from e
    recipe = {"kind": "import", "path": str(source), **({"base": base.id} if base is not None else {})}
    parents = [base.id] if base is not None else []
    record = ModelRecord(id=body.id, recipe=recipe, parents=parents, **info, **fields)
    try:
        added = register_placed(store, registry, record, require=parents)
    except ParentGoneError as e:
        raise HTTPException(409, str(e)) from e
    if not added:
        raise HTTPException(409, f"model {body.id!r} already exists")
    return ModelObject.of(record)


def _import_base(body: ImportRequest, registry: Registry, store: ModelStore) -> ModelRecord | None:
    """The registered model an import names as its base (422 when it is missing or an adapter)."""
    if body.base is None:
        return None
    record = registry.get(body.base)
    if record is None or not store.path(body.base).is_dir():
        raise HTTPException(422, f"base model {body.base!r} is not registered (see GET /v1/models)")
    if record.type == "adapter":
        raise HTTPException(422, f"base {body.base!r} is a LoRA adapter, not a model")
    if record.delta is not None:
        raise HTTPException(
            422, f"base {body.base!r} is itself stored as a delta of {record.base_model!r}; import over that"
        )
    return record
