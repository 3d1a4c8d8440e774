"""Turning a model reference (a registry id, or a directory under an import root) into a directory."""

from __future__ import annotations

import os
from pathlib import Path

from workers.store.file_manifest import verify_files
from workers.store.model_files import ModelFileError, check_links
from workers.store.registry import Registry
from workers.tensors.safetensors_io import INDEX_FILE, is_weights_name, stored_delta_base

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


class ModelReferenceError(ValueError):
    pass


class UnknownModelError(ModelReferenceError):
    pass


def check_model_directory(directory: Path) -> None:
    """A loadable HF directory: config.json and safetensors weights (pickled weights are never read)."""
    if not (directory / "config.json").is_file():
        raise ModelReferenceError(f"{directory} has no config.json")
    try:
        check_links(directory)
    except ModelFileError as e:
        raise ModelReferenceError(f"{directory}: {e}") from e
    if not (directory / INDEX_FILE).exists() and not any(
        is_weights_name(p.name) for p in directory.glob("*.safetensors")
    ):
        pickled = [p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickled:
            raise ModelReferenceError(
                f"{directory} has only pickled weights ({pickled[0]}); Strata reads safetensors only"
            )
        raise ModelReferenceError(
            f"{directory} has no safetensors weights (model.safetensors or model.safetensors.index.json)"
        )


MAX_PATH_BYTES, MAX_NAME_BYTES = 4096, 255  # Linux's PATH_MAX and NAME_MAX


def check_path_text(path: str) -> None:
    """A path the file system can take at all: no NUL, valid Unicode, not too long (else the first system
    call on it fails with ValueError, UnicodeEncodeError or ENAMETOOLONG, far from the request)."""
    if "\x00" in path:
        raise ModelReferenceError("a path cannot contain a NUL character")
    try:
        encoded = path.encode("utf-8")
    except UnicodeEncodeError:
        raise ModelReferenceError("a path must be valid Unicode (it holds a lone surrogate)") from None
    if len(encoded) > MAX_PATH_BYTES or any(len(name) > MAX_NAME_BYTES for name in encoded.split(b"/")):
        raise ModelReferenceError(
            f"a path is at most {MAX_PATH_BYTES} bytes, each of its names at most {MAX_NAME_BYTES}"
        )


def resolve_path(path: str, import_roots: list[Path], directory: bool = True) -> Path:
    """A model directory (or, with directory=False, a file) under one of `import_roots`, after resolving
    symlinks and '..'."""
    check_path_text(path)
    try:
        return _resolve_path(path, import_roots, directory)
    except OSError as e:  # unreadable on the way (permissions, a loop): the request's path, said without it
        raise ModelReferenceError(f"cannot read {path}: {e.strerror or type(e).__name__}") from e


def _resolve_path(path: str, import_roots: list[Path], directory: bool) -> Path:
    real = Path(os.path.realpath(path))
    roots = [Path(os.path.realpath(r)) for r in import_roots]
    if not any(real == root or real.is_relative_to(root) for root in roots):
        shown = ", ".join(str(r) for r in roots) or "none configured"
        raise ModelReferenceError(f"{path} is outside the import roots ({shown}); set STRATA_IMPORT_ROOTS")
    if not directory:
        if not real.is_file():
            raise ModelReferenceError(f"no file at {path}")
        if real.stat().st_nlink > 1:  # another name of its data may lie outside every import root
            raise ModelReferenceError(
                f"{path} is a hard link (its data has other names); copy the file instead"
            )
        return real
    if not real.is_dir():
        raise UnknownModelError(f"no model directory at {path}")
    check_model_directory(real)
    return real


def is_registry_id(ref: str) -> bool:
    """Registry ids have no path separator and do not start with '.'; anything else is a directory."""
    return "/" not in ref and not ref.startswith(".")


def resolve_model(
    ref: str, registry: Registry, store_root: Path, import_roots: list[Path], *, tensors: bool = True
) -> Path:
    """Registry ids win; anything with a path separator is a directory under an import root. A variant
    stored only as a delta resolves, for a job that reads tensors, to a materialised copy (base + delta;
    workers.store.delta_only); with `tensors=False` (the API's checks: config and headers only) to its
    own directory, whose headers are its base's."""
    if is_registry_id(ref):
        record = registry.get(ref)
        if record is not None and record.type == "adapter":
            raise ModelReferenceError(f"{ref!r} is a LoRA adapter of {record.base_model!r}, not a model")
        if record is None:
            raise UnknownModelError(f"model {ref!r} is not registered (see GET /v1/models)")
        verify_files(ref, store_root / ref, record.files)
        base = stored_delta_base(store_root / ref)
        if base is None:
            return store_root / ref
        base_record = registry.get(base)
        if base_record is None:
            raise ModelReferenceError(
                f"model {ref!r} is stored as a delta of {base!r}, which is not registered"
            )
        verify_files(base, store_root / base, base_record.files)
        if not tensors:
            return store_root / ref
        from workers.store.delta_only import full_model_dir  # the tensor math, only where tensors are read

        try:
            return full_model_dir(store_root, ref)
        except ModelFileError as e:
            raise ModelReferenceError(f"model {ref!r}: {e}") from e
    return resolve_path(ref, import_roots)
