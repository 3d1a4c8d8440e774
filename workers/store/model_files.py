"""The files a model directory references, each one resolved (realpath) inside that directory.

A model directory is untrusted input: its index may name `../` or absolute shards, its files may be
symlinks to anywhere. Every file Strata reads for a model goes through `contained`, and errors name the
file relative to the model directory, never its contents or where the directory lives.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path
from typing import Any

MAX_JSON_BYTES = 16 << 20
# Sizes the code does arithmetic with: each must be a positive integer when present.
INT_FIELDS = (
    "num_hidden_layers",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "max_position_embeddings",
)
MAX_SIZE = 1 << 31


class ModelFileError(ValueError):
    """A model directory references a file outside itself, or holds a malformed file."""


def shown(name: object, limit: int = 80) -> str:
    """A name for an error message: repr'd, and cut to `limit` characters."""
    text = repr(name)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def contained(directory: Path, name: str) -> Path:
    """`directory / name` after resolving symlinks and '..', which must stay inside `directory`."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise ModelFileError(f"file name {shown(name)} is not a relative file name")
    root = Path(os.path.realpath(directory))
    real = Path(os.path.realpath(root / name))
    if real == root or not real.is_relative_to(root):
        raise ModelFileError(f"{shown(name)} resolves outside the model directory")
    try:
        links = os.stat(real).st_nlink
    except OSError:
        return real  # missing: the caller says so
    if links > 1 and real.is_file():
        raise ModelFileError(
            f"{shown(name)} is a hard link (its data has other names); copy the file instead"
        )
    return real


def copy_contained(directory: Path, name: str, target: Path) -> None:
    """Copy a file of the model directory (checked by `contained`) to `target`, a new file of its own: the
    data is read from a descriptor checked again once open (a regular file with one link), so a file
    swapped for a link meanwhile is refused too."""
    source = contained(directory, name)
    fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as src:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink > 1:
            raise ModelFileError(f"{shown(name)} is not a regular file with a single link")
        with open(target, "xb") as out:
            shutil.copyfileobj(src, out, 1 << 24)


def check_links(directory: Path) -> None:
    """Every entry of the directory that is a symlink must point inside it, and every file must be the
    only name of its data (a hard link could name a file anywhere on the disk)."""
    for entry in Path(directory).iterdir():
        if entry.is_symlink() or entry.is_file():
            contained(directory, entry.name)


def read_json(directory: Path, name: str) -> Any:
    """A JSON file of the model directory, size-capped; ModelFileError for anything unreadable."""
    path = contained(directory, name)
    if not path.is_file():
        raise ModelFileError(f"no {name}")
    if path.stat().st_size > MAX_JSON_BYTES:
        raise ModelFileError(f"{name} is larger than {MAX_JSON_BYTES} bytes")
    try:
        return json.loads(path.read_bytes())
    except (ValueError, RecursionError) as e:  # no detail: it could quote the file
        raise ModelFileError(f"{name} is not valid JSON") from e


def read_config(directory: Path) -> dict[str, Any]:
    """config.json as a dict whose sizes are positive integers and whose architectures are names."""
    config = read_json(directory, "config.json")
    if not isinstance(config, dict):
        raise ModelFileError("config.json is not a JSON object")
    for key in INT_FIELDS:
        value = config.get(key)
        if value is not None and (
            not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_SIZE
        ):
            raise ModelFileError(f"config.json: {key} must be a positive integer up to {MAX_SIZE}")
    architectures = config.get("architectures")
    if architectures is not None and not (
        isinstance(architectures, list) and all(isinstance(a, str) for a in architectures)
    ):
        raise ModelFileError("config.json: architectures must be a list of names")
    model_type = config.get("model_type")
    if model_type is not None and not isinstance(model_type, str):
        raise ModelFileError("config.json: model_type must be a string")
    return config
