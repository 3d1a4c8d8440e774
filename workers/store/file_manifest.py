"""What a model's files were when it was registered, checked whenever the model is loaded.

At import and publish the registry records, for config.json and every weights file, its size, SHA-256,
modification time and inode. Before a job or the inference worker reads the model, each file is checked:
a file whose size differs, or whose content differs when its time or inode moved, means the model is not
the one registered (rewritten in place, truncated, replaced) and it is refused with a short reason naming
the model and the file, instead of serving whatever the files now hold.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from workers.store.model_files import contained
from workers.tensors.safetensors_io import DELTA_META, DELTA_WEIGHTS, stored_delta_base, weight_files

CHUNK = 1 << 20


class ModelFilesChangedError(ValueError):
    """A registered model's files are not the ones recorded when it was registered."""


def _digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def recorded_names(directory: Path) -> list[str]:
    """The files that make the model: config.json (a model; adapter_config.json for an adapter), the
    weights, and the delta to its base it is served with (a variant kept as its delta alone has no
    weights). Side files (exit adapters, written later) and tokenizer files are not recorded."""
    directory = Path(directory)
    config = "config.json" if (directory / "config.json").exists() else "adapter_config.json"
    weights = [p.name for p in weight_files(directory)] if stored_delta_base(directory) is None else []
    delta = [name for name in (DELTA_WEIGHTS, DELTA_META) if (directory / name).is_file()]
    return [config, *weights, *delta]


def record_files(directory: Path) -> dict[str, dict[str, Any]]:
    """name -> {size, sha256, mtime_ns, inode} of every file `recorded_names` lists."""
    files = {}
    for name in recorded_names(directory):
        path = contained(directory, name)
        st = os.stat(path)
        files[name] = {
            "size": st.st_size,
            "sha256": _digest(path),
            "mtime_ns": st.st_mtime_ns,
            "inode": st.st_ino,
        }
    return files


def verify_files(model_id: str, directory: Path, recorded: dict[str, dict[str, Any]] | None) -> None:
    """ModelFilesChangedError unless every recorded file is there, alone on its inode, with its recorded
    size and content (hashed only when its time or inode moved). Records from before files were recorded
    (None) are not checked."""
    if not recorded:
        return
    for name, want in recorded.items():
        path = Path(directory) / name
        try:
            st = os.stat(path)
        except OSError:
            raise ModelFilesChangedError(
                f"model {model_id!r} is damaged: its file {name} is missing; delete and re-import it"
            ) from None
        if st.st_nlink > 1:
            raise ModelFilesChangedError(
                f"model {model_id!r}: its file {name} shares its data with another file (a hard link); "
                "delete and re-import it"
            )
        changed = st.st_size != want["size"]
        if not changed and (st.st_mtime_ns, st.st_ino) != (want["mtime_ns"], want["inode"]):
            changed = _digest(path) != want["sha256"]
        if changed:
            raise ModelFilesChangedError(
                f"model {model_id!r} changed on disk since it was registered ({name} differs); "
                "delete and re-import it"
            )
