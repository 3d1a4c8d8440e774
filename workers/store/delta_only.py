"""Variants kept in the store as their delta alone: the full weights dropped once the delta is stored, and
materialised again (base + D_hat, what is served) where a job reads the model's tensors.

A variant's directory then holds its config, tokenizer and side files, `variant_delta.safetensors` and
`variant_delta.json`, and no weights: its tensor layout (names, shapes, dtypes) is its base's, checked
before the weights go, so shape checks and size estimates read the base's headers (TensorReader does).
A job that needs tensors gets a materialised copy in the store's `.materialised/` folder, made once per
process and removed with the process (ModelStore.clean_stale_staging), so the store keeps only the
delta. Nothing here knows about HTTP or Redis.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from workers.store.file_manifest import record_files
from workers.store.model_files import ModelFileError
from workers.store.model_store import MATERIALISED, ModelStore, describe, directory_size
from workers.tensors.safetensors_io import (
    DELTA_META,
    DELTA_WEIGHTS,
    INDEX_FILE,
    TensorReader,
    is_weights_name,
    stored_delta_base,
    weight_files,
)
from workers.variants_delta import describe_delta, materialise

_copies: dict[tuple[str, tuple[int, int, int]], Path] = {}  # (model id, delta file stat) -> copy


def _layout(directory: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    with TensorReader(directory) as reader:
        return {name: (str(e.dtype), tuple(e.shape)) for name, e in reader.entries.items()}


def drop_full_weights(directory: Path, base_dir: Path) -> bool:
    """Remove the weights of a model whose delta to `base_dir` is stored beside them, when its tensor
    layout is the base's; False (nothing removed) when there is no delta or the layouts differ (a variant
    in another dtype keeps its weights)."""
    directory = Path(directory)
    if not (directory / DELTA_META).is_file() or not (directory / DELTA_WEIGHTS).is_file():
        return False
    if _layout(directory) != _layout(base_dir):
        return False
    for file in weight_files(directory):
        file.unlink()
    (directory / INDEX_FILE).unlink(missing_ok=True)
    return True


def describe_stored(directory: Path, base_dir: Path | None, keep_full_weights: bool) -> dict[str, Any]:
    """The registry fields of a finished model directory; a model whose delta is stored (`delta`) keeps
    only the delta unless `keep_full_weights` (or its layout is not its base's). The model is described
    before its weights go (its parameters and dtype are the full model's), its files after."""
    fields = {**describe(directory), **describe_delta(directory)}
    delta = fields.get("delta")
    if delta is None:
        return fields
    dropped = base_dir is not None and not keep_full_weights and drop_full_weights(directory, base_dir)
    fields["delta"] = {**delta, "full_weights": not dropped}
    if dropped:
        fields["size_bytes"] = directory_size(directory)
        fields["files"] = record_files(directory)
    return fields


def full_model_dir(store_root: Path, model_id: str, max_shard_bytes: int = 2 << 30) -> Path:
    """The directory to read `model_id`'s tensors from: its own, or for a variant stored only as a delta
    a materialised copy (base + D_hat weights, the variant's other files) in the store's `.materialised/`
    folder, made once per process and removed with the process."""
    directory = Path(store_root) / model_id
    base = stored_delta_base(directory)
    if base is None:
        return directory
    stat = (directory / DELTA_WEIGHTS).stat()
    key = (model_id, (stat.st_size, stat.st_mtime_ns, stat.st_ino))
    cached = _copies.get(key)
    if cached is not None and cached.is_dir():
        _copy_side_files(directory, cached)  # exit adapters fitted since, a new tokenizer file
        return cached
    base_dir = Path(store_root) / base
    if not (base_dir / "config.json").is_file():
        raise ModelFileError(f"model {model_id!r} is stored as a delta of {base!r}, which is missing")
    out = ModelStore(store_root).scratch(model_id, MATERIALISED)
    try:
        _copy_side_files(directory, out)
        materialise(base_dir, directory, out, max_shard_bytes)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    _copies[key] = out
    return out


def _copy_side_files(directory: Path, out: Path) -> None:
    """The variant's files other than its delta (config, tokenizer, exit adapters) into its copy, as they
    are now; side files the variant no longer has go from the copy (its weights stay)."""
    names = set()
    for item in sorted(directory.iterdir()):
        if item.is_file() and not item.is_symlink() and item.name not in (DELTA_WEIGHTS, DELTA_META):
            shutil.copyfile(item, out / item.name)
            names.add(item.name)
    for item in out.iterdir():
        if item.name not in names and not is_weights_name(item.name) and item.name != INDEX_FILE:
            item.unlink()
