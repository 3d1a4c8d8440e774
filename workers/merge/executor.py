"""Run a merge recipe tensor by tensor: read the same-named tensor from every input, merge, write.

Peak memory is a few tensors times the number of models, whatever the model size. Inputs are memory-
mapped tensor by tensor (no read copy), and a background thread maps the next tensor group and writes
the previous result while the current one is merged, so the disk and the arithmetic overlap. The
arithmetic uses torch's intra-op threads (all cores unless the process says otherwise, e.g. with
OMP_NUM_THREADS or torch.set_num_threads).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from workers.device import default_device
from workers.merge.config import MergeConfig
from workers.merge.homology import check_homologous, read_config
from workers.merge.parameters import layer_position, resolve
from workers.merge.registry import METHODS, MergeMethod, TensorGroup
from workers.merge.tokenizer_output import TOKENIZER_FILES, copy_tokenizer, write_tokenizer  # noqa: F401
from workers.merge.vocabulary import build_vocabulary, is_vocabulary_tensor
from workers.tensors.safetensors_io import PlannedTensor, ShardedWriter, TensorReader

Progress = Callable[[int, int, str], None]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


@dataclass
class MergeResult:
    tensors: int
    bytes_written: int
    seconds: float
    device: str


def tensor_seed(seed: int, tensor_name: str, model_index: int) -> int:
    """A stable per-(tensor, model) seed, independent of tensor order and device."""
    digest = hashlib.sha256(f"{seed}:{tensor_name}:{model_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _group(
    config: MergeConfig,
    method: MergeMethod,
    name: str,
    t: float,
    base: torch.Tensor | None,
    tensors: list[torch.Tensor],
) -> TensorGroup:
    entries = config.merged_entries
    model_params = [
        {
            key: resolve(key, method.model_params, e.parameters, config.parameters, tensor_name=name, t=t)
            for key in method.model_params
        }
        for e in entries
    ]
    params = {
        key: resolve(key, method.global_params, config.parameters, tensor_name=name, t=t)
        for key in method.global_params
    }
    params["tie_break"] = config.tie_break
    generators = (
        [torch.Generator().manual_seed(tensor_seed(config.seed, name, i)) for i in range(len(entries))]
        if method.random
        else []
    )
    return TensorGroup(name, base, tensors, model_params, params, generators)


def merge_models(
    config: MergeConfig,
    paths: dict[str, Path],
    out_dir: Path,
    *,
    device: torch.device | None = None,
    max_shard_bytes: int = 2 << 30,
    progress: Progress | None = None,
) -> MergeResult:
    """Merge the models named in `config` (resolved to directories by `paths`) into `out_dir`."""
    start = time.perf_counter()
    device = device or default_device()
    method = METHODS[config.merge_method]
    reference = config.reference_model
    vocabulary = build_vocabulary(config, paths)  # None: the reference model's vocabulary as it is
    check_homologous({ref: paths[ref] for ref in config.input_models}, vocabulary is not None)
    ref_config = read_config(paths[reference])
    num_layers = int(ref_config.get("num_hidden_layers", 1))
    compute_dtype = DTYPES[config.dtype] if config.dtype else None
    out_dtype = DTYPES[config.out_dtype or config.dtype] if (config.out_dtype or config.dtype) else None

    readers = {ref: TensorReader(paths[ref]) for ref in config.input_models}
    try:
        entries = readers[reference].entries

        def target_dtype(e) -> torch.dtype:
            return out_dtype if out_dtype and e.dtype.is_floating_point else e.dtype

        def load_group(name: str) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
            """The base tensor (when the method needs one) and the merged models' tensors."""
            entry = entries[name]
            if not entry.dtype.is_floating_point:
                return None, [readers[reference].load(name)]
            dtype = compute_dtype or entry.dtype

            def load(ref: str) -> torch.Tensor:
                return readers[ref].map(name).to(device=device, dtype=dtype)

            if vocabulary is not None and is_vocabulary_tensor(name):  # rows moved onto the output vocabulary
                rows = vocabulary.align({ref: load(ref) for ref in gathered})
                base = rows[config.base_model] if method.needs_base else None
                return base, [rows[e.model] for e in config.merged_entries]
            base = load(config.base_model) if method.needs_base else None
            return base, [load(e.model) for e in config.merged_entries]

        # mergekit's order of the models a tensor is gathered from: those listed, then an unlisted base
        listed = [m.model for m in config.models]
        gathered = list(dict.fromkeys(listed + ([config.base_model] if method.needs_base else [])))

        def shape(name: str, entry) -> tuple[int, ...]:
            if vocabulary is not None and is_vocabulary_tensor(name):
                return (vocabulary.size, *entry.shape[1:])
            return entry.shape

        plan = [PlannedTensor(n, target_dtype(e), shape(n, e)) for n, e in entries.items()]
        writer = ShardedWriter(out_dir, plan, max_shard_bytes)
        try:
            with ThreadPoolExecutor(1, thread_name_prefix="merge-io") as io:
                names = list(entries)
                pending = io.submit(load_group, names[0]) if names else None
                writes = []
                for i, name in enumerate(names):
                    base, tensors = pending.result()
                    if i + 1 < len(names):  # read the next group while this one is merged
                        pending = io.submit(load_group, names[i + 1])
                    if entries[name].dtype.is_floating_point:
                        t = layer_position(name, num_layers)
                        merged = method.fn(_group(config, method, name, t, base, tensors))
                    else:
                        merged = tensors[0]
                    del base, tensors
                    writes.append(io.submit(writer.write, name, merged.to(target_dtype(entries[name]))))
                    del merged
                    writes = _drain(writes, keep=1)
                    if progress:
                        progress(i + 1, len(entries), f"{i + 1}/{len(entries)} tensors merged")
                _drain(writes, keep=0)
            writer.close()
        except BaseException:
            writer.abort()
            raise
    finally:
        for reader in readers.values():
            reader.close()

    _write_config(out_dir, ref_config, out_dtype, vocabulary.size if vocabulary else None)
    write_tokenizer(config, paths, out_dir, vocabulary)
    written = sum((out_dir / f).stat().st_size for f in writer.files)
    return MergeResult(len(plan), written, time.perf_counter() - start, str(device))


def _drain(writes: list, keep: int) -> list:
    """Wait for all but the last `keep` submitted writes (re-raising their errors)."""
    while len(writes) > keep:
        writes.pop(0).result()
    return writes


def _write_config(
    out_dir: Path, ref_config: dict, out_dtype: torch.dtype | None, vocab_size: int | None = None
) -> None:
    config = dict(ref_config)
    if vocab_size is not None:
        config["vocab_size"] = vocab_size
    if out_dtype is not None:
        config["dtype"] = DTYPE_NAMES[out_dtype]
        config.pop("torch_dtype", None)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
