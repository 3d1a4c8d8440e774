"""Run a merge recipe tensor by tensor: read each output tensor's inputs (workers.merge.plan), merge, write.

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
from typing import Any

import torch

from workers.device import default_device
from workers.merge.config import MergeConfig
from workers.merge.homology import read_config
from workers.merge.parameters import resolve
from workers.merge.plan import OutputTensor, output_config, plan_merge
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


class MissingParameterError(ValueError):
    """A required parameter whose settings (filters) give no value for some tensor."""


def tensor_parameters(
    config: MergeConfig, method: MergeMethod, planned: OutputTensor
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The per-model and global parameters of one output tensor, in mergekit's precedence: the source's
    own settings (evaluated on its input tensor's name), then the slice's, then the global ones."""
    spec, name, t = planned.slice, planned.name, planned.t
    input_name = dict(zip((s.model for s in spec.sources), planned.inputs, strict=True))
    model_params = [
        {
            key: resolve(
                key,
                method.model_params,
                source.parameters,
                spec.parameters,
                config.parameters,
                tensor_name=input_name[source.model],
                t=t,
            )
            for key in method.model_params
        }
        for source in spec.merged
    ]
    params = {
        key: resolve(key, method.global_params, spec.parameters, config.parameters, tensor_name=name, t=t)
        for key in method.global_params
    }
    for values in (params, *model_params):
        missing = [key for key, value in values.items() if value is None]
        if missing:
            raise MissingParameterError(f"no value of parameter {missing[0]!r} applies to tensor {name!r}")
    params["tie_break"] = config.tie_break
    return model_params, params


def _group(
    config: MergeConfig,
    method: MergeMethod,
    planned: OutputTensor,
    base: torch.Tensor | None,
    tensors: list[torch.Tensor],
) -> TensorGroup:
    """The method's view of one output tensor."""
    model_params, params = tensor_parameters(config, method, planned)
    generators = (
        [
            torch.Generator().manual_seed(tensor_seed(config.seed, planned.name, i))
            for i in range(len(tensors))
        ]
        if method.random
        else []
    )
    return TensorGroup(planned.name, base, tensors, model_params, params, generators)


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
    vocabulary = build_vocabulary(config, paths)  # None: the reference model's vocabulary as it is
    plan = plan_merge(config, paths)
    reference = plan.reference
    compute_dtype = DTYPES[config.dtype] if config.dtype else None
    out_dtype = DTYPES[config.out_dtype or config.dtype] if (config.out_dtype or config.dtype) else None

    readers = {ref: TensorReader(paths[ref]) for ref in config.input_models}
    try:

        def target_dtype(e) -> torch.dtype:
            return out_dtype if out_dtype and e.dtype.is_floating_point else e.dtype

        def load_group(planned: OutputTensor) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
            """The base tensor (when the method takes one) and the merged models' tensors."""
            spec = planned.slice
            input_name = dict(zip((s.model for s in spec.sources), planned.inputs, strict=True))
            if not planned.entry.dtype.is_floating_point:
                first = reference if reference in input_name else spec.sources[0].model
                return None, [readers[first].load(input_name[first])]
            dtype = compute_dtype or planned.entry.dtype
            loaded: dict[str, torch.Tensor] = {}

            def load(ref: str) -> torch.Tensor:
                """Each model's tensor is mapped once, however often the recipe lists the model."""
                if ref not in loaded:
                    loaded[ref] = readers[ref].map(input_name[ref]).to(device=device, dtype=dtype)
                return loaded[ref]

            if vocabulary is not None and is_vocabulary_tensor(planned.name):
                # rows moved onto the output vocabulary, for every source of the tensor's slice
                rows = vocabulary.align({s.model: load(s.model) for s in spec.sources})
                return (rows[spec.base] if spec.base else None), [rows[s.model] for s in spec.merged]
            base = load(spec.base) if spec.base else None
            return base, [load(s.model) for s in spec.merged]

        def shape(planned: OutputTensor) -> tuple[int, ...]:
            if vocabulary is not None and is_vocabulary_tensor(planned.name):
                return (vocabulary.size, *planned.entry.shape[1:])
            return planned.entry.shape

        outputs = plan.tensors
        writer_plan = [PlannedTensor(p.name, target_dtype(p.entry), shape(p)) for p in outputs]
        writer = ShardedWriter(out_dir, writer_plan, max_shard_bytes)
        try:
            with ThreadPoolExecutor(1, thread_name_prefix="merge-io") as io:
                pending = io.submit(load_group, outputs[0]) if outputs else None
                writes = []
                for i, planned in enumerate(outputs):
                    base, tensors = pending.result()
                    if i + 1 < len(outputs):  # read the next group while this one is merged
                        pending = io.submit(load_group, outputs[i + 1])
                    if planned.entry.dtype.is_floating_point:
                        merged = method.fn(_group(config, method, planned, base, tensors))
                    else:
                        merged = tensors[0]
                    del base, tensors
                    out = merged.to(target_dtype(planned.entry))
                    writes.append(io.submit(writer.write, planned.name, out))
                    del merged, out
                    writes = _drain(writes, keep=1)
                    if progress:
                        progress(i + 1, len(outputs), f"{i + 1}/{len(outputs)} tensors merged")
                _drain(writes, keep=0)
            writer.close()
        except BaseException:
            writer.abort()
            raise
    finally:
        for reader in readers.values():
            reader.close()

    configs = {ref: read_config(paths[ref]) for ref in {reference, *(ref for ref, _ in plan.layer_origin)}}
    _write_config(out_dir, output_config(plan, configs), out_dtype, vocabulary.size if vocabulary else None)
    write_tokenizer(config, paths, out_dir, vocabulary)
    written = sum((out_dir / f).stat().st_size for f in writer.files)
    return MergeResult(len(writer_plan), written, time.perf_counter() - start, str(device))


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
