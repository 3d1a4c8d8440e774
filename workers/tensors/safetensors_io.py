"""Stream tensors in and out of safetensors files one at a time.

Reading: `load` reads a tensor with one positioned read into a fresh buffer; `map` maps just that
tensor's pages of the file, privately (a write to the tensor copies the page and never reaches the
file), so reading costs no copy and the pages are let go with the tensor. Either way memory holds only
the tensors in use (one map of the whole file would keep every touched page resident until closed).
Writing: the output's names, dtypes and shapes are known before the first tensor is merged, so each
shard's header is written first and tensors are appended as they arrive, in plan order.

Format (https://github.com/huggingface/safetensors): 8-byte little-endian header length N, N bytes of
JSON {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}, then the data.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import re
import shutil
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from workers.store.model_files import ModelFileError, contained, read_json, shown

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
INDEX_FILE = "model.safetensors.index.json"
# A variant stored as its base + a compressed delta (workers.variants_delta) keeps these two files and, once
# its full weights are dropped, no weights of its own: its tensor layout is its base's (checked then).
DELTA_WEIGHTS = "variant_delta.safetensors"
DELTA_META = "variant_delta.json"
STORED_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # a registry id: a plain name in the store


class SafetensorsError(ModelFileError):
    """A safetensors file or model directory is missing, malformed or unsupported."""


@dataclass(frozen=True)
class TensorEntry:
    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


MAX_HEADER_BYTES = 100_000_000
MAX_DIMS = 16
MAX_DIM = 1 << 48


def _int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _entry(path: Path, name: str, info: object, data_start: int, data_bytes: int) -> TensorEntry:
    """One header entry, checked: known dtype, non-negative shape, offsets inside the data that hold
    exactly numel x itemsize bytes."""
    where = f"{path.name}: tensor {shown(name)}"
    if not isinstance(info, dict):
        raise SafetensorsError(f"{where}: entry is not an object")
    dtype = info.get("dtype")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise SafetensorsError(f"{where}: unsupported dtype {shown(dtype, 20)}")
    shape = info.get("shape")
    if not (
        isinstance(shape, list)
        and len(shape) <= MAX_DIMS
        and all(_int(d) and 0 <= d <= MAX_DIM for d in shape)
    ):
        raise SafetensorsError(f"{where}: shape must be a list of at most {MAX_DIMS} non-negative sizes")
    offsets = info.get("data_offsets")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_int(o) for o in offsets)):
        raise SafetensorsError(f"{where}: data_offsets must be two integers")
    begin, end = offsets
    if not 0 <= begin <= end <= data_bytes:
        raise SafetensorsError(f"{where}: data_offsets lie outside the file's data or are reversed")
    if end - begin != math.prod(shape) * DTYPES[dtype].itemsize:
        raise SafetensorsError(f"{where}: data_offsets do not span shape x dtype size")
    return TensorEntry(name, path, DTYPES[dtype], tuple(shape), data_start + begin, data_start + end)


def read_header(path: Path) -> dict[str, TensorEntry]:
    """The tensor entries of one safetensors file, in file order, after checking every entry against the
    file: a lying header is refused here, naming the tensor, before any tensor is read."""
    with open(path, "rb") as f:
        file_size = os.fstat(f.fileno()).st_size
        raw = f.read(8)
        if len(raw) != 8:
            raise SafetensorsError(f"{path.name}: not a safetensors file (too short)")
        (size,) = struct.unpack("<Q", raw)
        if size > min(MAX_HEADER_BYTES, file_size - 8):  # the length itself is not echoed: it is file bytes
            raise SafetensorsError(f"{path.name}: not a safetensors file (header length beyond the file)")
        text = f.read(size)
    try:
        header = json.loads(text)
    except (ValueError, RecursionError) as e:  # no detail: it could quote the file
        raise SafetensorsError(f"{path.name}: unreadable header (not JSON)") from e
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path.name}: header is not a JSON object")
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict):
        raise SafetensorsError(f"{path.name}: __metadata__ is not an object")
    data_start = 8 + size
    data_bytes = file_size - data_start
    entries = {
        name: _entry(path, name, info, data_start, data_bytes)
        for name, info in header.items()
        if name != "__metadata__"
    }
    ordered = dict(sorted(entries.items(), key=lambda kv: (kv[1].begin, kv[1].end)))
    previous: TensorEntry | None = None
    for entry in ordered.values():
        if previous is not None and entry.begin < previous.end:
            raise SafetensorsError(f"{path.name}: tensor {shown(entry.name)} overlaps {shown(previous.name)}")
        if entry.nbytes:
            previous = entry
    return ordered


SINGLE_FILE = "model.safetensors"
SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
ADAPTER_FILE = "adapter_model.safetensors"  # a PEFT adapter directory's weights


def is_weights_name(name: str) -> bool:
    """A standard name of a model's weights (one file, or an unindexed shard); any other .safetensors
    file in the directory (exit adapters, a LoRA adapter) is a side file, never part of the weights."""
    return name == SINGLE_FILE or SHARD_NAME.fullmatch(name) is not None


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files holding a model directory's weights, each resolved inside the directory: the
    shards its index names when it has one, else `model.safetensors` or `model-0000i-of-0000n` shards,
    else (a PEFT adapter directory) `adapter_model.safetensors`. Side files are never weights. An index
    entry or a symlink that leads out of the directory is refused."""
    directory = Path(directory)
    if (directory / INDEX_FILE).exists():
        index = read_json(directory, INDEX_FILE)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise SafetensorsError(f"{INDEX_FILE} has no weight_map object")
        files = []
        for name in dict.fromkeys(weight_map.values()):
            file = contained(directory, name)
            if not file.is_file():
                raise SafetensorsError(f"{INDEX_FILE} names a shard that is missing: {shown(name)}")
            files.append(file)
        return files
    names = sorted(p.name for p in directory.glob("*.safetensors") if is_weights_name(p.name))
    if not names and (directory / ADAPTER_FILE).exists():
        names = [ADAPTER_FILE]
    if not names:
        raise SafetensorsError(f"no model weights ({SINGLE_FILE}, {INDEX_FILE} or model-*-of-* shards)")
    return [contained(directory, name) for name in names]


def has_weights(directory: Path) -> bool:
    """The directory holds weights of its own (not only a delta to its base)."""
    directory = Path(directory)
    return (directory / INDEX_FILE).exists() or any(
        is_weights_name(p.name) or p.name == ADAPTER_FILE for p in directory.glob("*.safetensors")
    )


def delta_base(directory: Path) -> str | None:
    """The id of the base a model directory is stored as a delta of (with or without weights of its own),
    None for a plain model."""
    directory = Path(directory)
    if not (directory / DELTA_META).exists():
        return None
    meta = read_json(directory, DELTA_META)
    base = meta.get("base") if isinstance(meta, dict) else None
    if not isinstance(base, str) or not STORED_ID.fullmatch(base):
        raise SafetensorsError(f"{DELTA_META} names no valid base")
    return base


def stored_delta_base(directory: Path) -> str | None:
    """For a variant whose directory holds only its delta: the id of its base (a sibling directory in the
    store, whose safetensors headers are the variant's too); None for a directory with weights."""
    return None if has_weights(directory) else delta_base(directory)


class TensorReader:
    """All tensors of a model directory, loaded one at a time by name.

    A variant stored only as a delta has its base's names, shapes and dtypes: its `entries` are read from
    the base's headers (what shape checks and size estimates need), but its tensors are base + delta,
    which this reader does not compute: `load` and `map` refuse (materialise the model first, see
    workers.store.delta_only)."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.entries: dict[str, TensorEntry] = {}
        self.delta_of = stored_delta_base(self.directory)
        source = self.directory if self.delta_of is None else self.directory.parent / self.delta_of
        if self.delta_of is not None and (source.is_symlink() or not (source / "config.json").is_file()):
            raise SafetensorsError(f"the model is stored as a delta of {self.delta_of!r}, which is missing")
        for file in weight_files(source):
            self.entries.update(read_header(file))
        self._handles: dict[Path, int] = {}

    def _readable(self, name: str) -> TensorEntry:
        if self.delta_of is not None:
            raise SafetensorsError(
                f"the model is stored as a delta of {self.delta_of!r}: its tensor {shown(name)} is base + "
                "delta, read from a materialised copy"
            )
        return self.entries[name]

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for fd in self._handles.values():
            os.close(fd)
        self._handles.clear()

    @property
    def names(self) -> list[str]:
        return list(self.entries)

    def _fd(self, file: Path) -> int:
        """A read-only descriptor of `file`, opened once per reader."""
        if file not in self._handles:
            self._handles[file] = os.open(file, os.O_RDONLY)
        return self._handles[file]

    def load(self, name: str) -> torch.Tensor:
        entry = self._readable(name)
        fd = self._fd(entry.file)
        out = torch.empty(entry.shape, dtype=entry.dtype)
        view = memoryview(out.view(-1).view(torch.uint8).numpy()) if entry.nbytes else memoryview(b"")
        done = 0
        while done < entry.nbytes:
            n = os.preadv(fd, [view[done:]], entry.begin + done)
            if n <= 0:
                raise SafetensorsError(f"{entry.file.name}: truncated data for tensor {name}")
            done += n
        return out

    def map(self, name: str) -> torch.Tensor:
        """The tensor on a private memory map of its own bytes (`load` where a map cannot hold it)."""
        entry = self._readable(name)
        fd = self._fd(entry.file)
        if entry.nbytes == 0 or entry.begin % entry.dtype.itemsize or entry.end > os.fstat(fd).st_size:
            return self.load(name)  # nothing to map, misaligned, or truncated (load says so)
        skip = entry.begin % mmap.ALLOCATIONGRANULARITY
        pages = mmap.mmap(fd, skip + entry.nbytes, access=mmap.ACCESS_COPY, offset=entry.begin - skip)
        flat = torch.frombuffer(pages, dtype=entry.dtype, count=entry.numel, offset=skip)
        return flat.view(entry.shape)


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _split_shards(plan: list[PlannedTensor], max_shard_bytes: int) -> list[list[PlannedTensor]]:
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for item in plan:
        if shards[-1] and size + item.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += item.nbytes
    return shards


def _header_bytes(shard: list[PlannedTensor], metadata: dict[str, str]) -> bytes:
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for item in shard:
        header[item.name] = {
            "dtype": DTYPE_NAMES[item.dtype],
            "shape": list(item.shape),
            "data_offsets": [offset, offset + item.nbytes],
        }
        offset += item.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


class ShardedWriter:
    """Writes a planned set of tensors, in plan order, into one or more safetensors shards.

    `model.safetensors` when one shard suffices, else `model-0000i-of-0000n.safetensors` plus
    `model.safetensors.index.json`, the layout `transformers` loads.
    """

    def __init__(self, directory: Path, plan: Iterable[PlannedTensor], max_shard_bytes: int = 2 << 30):
        self.directory = Path(directory)
        self.shards = _split_shards(list(plan), max_shard_bytes)
        n = len(self.shards)
        self.files = (
            ["model.safetensors"]
            if n == 1
            else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        self._order = [(s, item) for s, shard in enumerate(self.shards) for item in shard]
        self._next = 0
        self._shard = -1
        self._f = None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        shard, item = self._order[self._next]
        if name != item.name:
            raise SafetensorsError(f"expected tensor {item.name} next, got {name}")
        if tensor.dtype != item.dtype or tuple(tensor.shape) != item.shape:
            raise SafetensorsError(
                f"tensor {name}: planned {item.dtype} {list(item.shape)}, "
                f"got {tensor.dtype} {list(tensor.shape)}"
            )
        if shard != self._shard:
            self._open(shard)
        data = tensor.detach().to("cpu").contiguous().view(-1)
        if data.numel():
            self._f.write(memoryview(data.view(torch.uint8).numpy()))
        self._next += 1

    def _open(self, shard: int) -> None:
        if self._f is not None:
            self._f.close()
        self._shard = shard
        self._f = open(self.directory / self.files[shard], "wb")
        self._f.write(_header_bytes(self.shards[shard], {"format": "pt"}))

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        if self._next != len(self._order):
            raise SafetensorsError(f"only {self._next} of {len(self._order)} planned tensors were written")
        if len(self.files) > 1:
            weight_map = {item.name: self.files[s] for s, item in self._order}
            total = sum(item.nbytes for _, item in self._order)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2))

    def abort(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


class AppendingWriter:
    """Writes tensors whose shapes are known only as they arrive (e.g. ranks found by an SVD) into one
    safetensors file: the data goes to a side file as each tensor comes, and `close` writes the header
    followed by that data. Memory holds one tensor at a time."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._body_path = self.path.with_name(self.path.name + ".data")
        self._body = open(self._body_path, "wb")
        self._planned: list[PlannedTensor] = []

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if any(item.name == name for item in self._planned):
            raise SafetensorsError(f"tensor {name} written twice")
        data = tensor.detach().to("cpu").contiguous().view(-1)
        self._planned.append(PlannedTensor(name, tensor.dtype, tuple(tensor.shape)))
        if data.numel():
            self._body.write(memoryview(data.view(torch.uint8).numpy()))

    def close(self) -> None:
        self._body.close()
        with open(self.path, "wb") as out, open(self._body_path, "rb") as body:
            out.write(_header_bytes(self._planned, {"format": "pt"}))
            shutil.copyfileobj(body, out, 1 << 24)
        self._body_path.unlink()

    def abort(self) -> None:
        self._body.close()
        self._body_path.unlink(missing_ok=True)
