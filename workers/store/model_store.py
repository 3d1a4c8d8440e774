"""Models on disk: Hugging Face directories under `<home>/models/<id>/`.

A model is built in a staging directory and renamed into place only when complete, so the store never
holds a half-written model. Staging directories of dead processes are removed at the next start.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from workers.processes import process_alive
from workers.store.file_manifest import record_files
from workers.store.model_files import check_links, read_config
from workers.tensors.safetensors_io import TensorReader, read_header

STAGING = ".staging"
MATERIALISED = ".materialised"  # full copies of variants stored as deltas alone, one per reading process


class ModelExistsError(FileExistsError):
    pass


class StoreError(OSError):
    """The store refused a change (permissions, a full or read-only disk). Its message gives the real
    cause and names no path (it would show where the store lives)."""


def store_error(e: OSError, doing: str) -> StoreError:
    return StoreError(e.errno, f"the model store refused {doing} ({e.strerror or type(e).__name__})")


class ModelStore:
    def __init__(self, root: Path):
        self.root = Path(root)
        try:
            (self.root / STAGING).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise store_error(e, "to create its staging directory") from None

    def path(self, model_id: str) -> Path:
        return self.root / model_id

    def exists(self, model_id: str) -> bool:
        return self.path(model_id).exists()

    @contextmanager
    def staging(self, model_id: str) -> Iterator[Path]:
        """Yield an empty directory; on success it becomes the model `model_id`, on failure it is removed."""
        if self.exists(model_id):
            raise ModelExistsError(f"model {model_id!r} already exists in the store")
        tmp = self.scratch(model_id)
        try:
            yield tmp
            try:
                os.rename(tmp, self.path(model_id))
            except OSError as e:
                if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
                    raise ModelExistsError(f"model {model_id!r} already exists in the store") from None
                raise store_error(e, f"to move model {model_id!r} into place") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def scratch(self, name: str, area: str = STAGING) -> Path:
        """A new empty directory in `area` (the staging area, or MATERIALISED) that lives as long as this
        process: removed by `clean_stale_staging` once the process is gone (its caller may remove it
        sooner)."""
        tmp = self.root / area / f"{name}.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        try:
            tmp.mkdir(parents=True)
        except OSError as e:
            raise store_error(e, "a new directory") from None
        return tmp

    def remove(self, model_id: str) -> None:
        """Move the model out of sight first (one rename), then delete its files."""
        trash = self.retire(model_id)
        if trash is not None:
            self.purge(trash)

    def retire(self, model_id: str) -> Path | None:
        """Rename the model's directory to a trash name (OSError, and nothing moved, if that fails); the
        trash path, or None when there was no directory."""
        target = self.path(model_id)
        if not target.exists():
            return None
        trash = self.root / STAGING / f"deleted.{model_id}.{uuid.uuid4().hex[:8]}"
        os.rename(target, trash)
        return trash

    def restore(self, model_id: str, trash: Path) -> None:
        """Undo `retire`."""
        os.rename(trash, self.path(model_id))

    @staticmethod
    def purge(trash: Path) -> None:
        """Delete a retired directory; what cannot be deleted now is removed at the next start."""
        shutil.rmtree(trash, ignore_errors=True)

    def clean_stale_staging(self) -> list[str]:
        """Remove staging directories left by processes of this host that are no longer alive."""
        removed = []
        host = socket.gethostname()
        areas = [self.root / STAGING, self.root / MATERIALISED]
        for entry in [e for area in areas if area.is_dir() for e in area.iterdir()]:
            parts = entry.name.rsplit(".", 2)  # <name>.<host>, <pid>, <hex>: a host name may hold dots
            stale = entry.name.startswith("deleted.")
            if len(parts) == 3 and parts[1].isdigit() and parts[0].endswith(f".{host}"):
                stale = stale or not process_alive(int(parts[1]))
            if stale:
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry.name)
        return removed


def directory_size(directory: Path) -> int:
    return sum(p.stat().st_size for p in Path(directory).rglob("*") if p.is_file())


def verify_model(directory: Path) -> None:
    """Check what a job is about to read: links stay inside, config.json is sane, every safetensors header
    is consistent with its file (ModelFileError naming the file or tensor otherwise)."""
    check_links(directory)
    read_config(Path(directory))
    TensorReader(directory).close()


def describe(directory: Path) -> dict[str, Any]:
    """What the registry records about a model directory, read from its config and safetensors headers."""
    check_links(directory)
    config = read_config(Path(directory))
    reader = TensorReader(directory)
    dtypes = sorted({str(e.dtype).removeprefix("torch.") for e in reader.entries.values()})
    return {
        "architecture": (config.get("architectures") or [config.get("model_type", "unknown")])[0],
        "num_layers": config.get("num_hidden_layers"),
        "num_parameters": sum(e.numel for e in reader.entries.values()),
        "dtype": dtypes[0] if len(dtypes) == 1 else ",".join(dtypes),
        "size_bytes": directory_size(directory),
        "files": record_files(directory),
    }


def describe_adapter(directory: Path, architecture: str, num_layers: int | None) -> dict[str, Any]:
    """The registry fields of a PEFT adapter directory (architecture and layers are its base model's)."""
    entries = read_header(Path(directory) / "adapter_model.safetensors").values()
    dtypes = sorted({str(e.dtype).removeprefix("torch.") for e in entries})
    return {
        "architecture": architecture,
        "num_layers": num_layers,
        "num_parameters": sum(e.numel for e in entries),
        "dtype": ",".join(dtypes),
        "size_bytes": directory_size(directory),
        "files": record_files(directory),
    }


def weights_bytes(directory: Path, float_dtype: torch.dtype | None = None) -> int:
    """Bytes of a model's weights, with floating tensors counted at `float_dtype` when given."""
    size = 0
    for entry in TensorReader(directory).entries.values():
        dtype = float_dtype if float_dtype is not None and entry.dtype.is_floating_point else entry.dtype
        size += entry.numel * dtype.itemsize
    return size


def max_rank(directory: Path) -> int:
    """The largest rank a matrix of the model can have: max over its 2-D tensors of min(rows, columns)."""
    return max(
        (min(e.shape) for e in TensorReader(directory).entries.values() if len(e.shape) == 2), default=1
    )


def lora_bytes(directory: Path, max_rank: int) -> int:
    """At most the bytes of a LoRA adapter of this model: rank-r factors of every matrix, but whole
    embeddings and LM head, and whole vectors."""
    size = 0
    for name, entry in TensorReader(directory).entries.items():
        numel = entry.numel
        if len(entry.shape) == 2 and "embed" not in name and "lm_head" not in name:
            numel = min(numel, max_rank * sum(entry.shape))
        size += numel * entry.dtype.itemsize
    return size
