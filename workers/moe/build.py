"""Build an MoE model from dense experts into a directory, tensor by tensor.

Router rows come first (`workers.moe.routers`; the `hidden` modes load the base model once, in
bfloat16, and free it before any weight is written). Then every output tensor is made from the inputs'
memory-mapped tensors and written in turn, so memory holds one layer's expert tensors at most.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig

from workers.device import default_device
from workers.merge.executor import DTYPES, copy_tokenizer, tensor_seed
from workers.merge.homology import check_homologous, read_config
from workers.moe.config import RANDOM_MODES, Expert, MoeConfig
from workers.moe.layouts import choose_layout, is_mlp, output_config, plan_tensors
from workers.moe.routers import RouterError, router_rows
from workers.tensors.safetensors_io import PlannedTensor, ShardedWriter, TensorReader

Progress = Callable[[int, int, str], None]


@dataclass
class MoeResult:
    architecture: str
    num_experts: int
    tensors: int
    bytes_written: int
    seconds: float
    device: str


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def check_moe_inputs(config: MoeConfig, paths: dict[str, Path]) -> str:
    """Raise HomologyError, LayoutError or RouterError for inputs that cannot make this MoE; return the
    layout."""
    check_homologous({ref: paths[ref] for ref in config.input_models})  # base first
    layout = choose_layout(config, {ref: read_config(paths[ref]) for ref in config.input_models})
    base = paths[config.base_model]
    if config.gate_mode not in RANDOM_MODES and not any((base / f).is_file() for f in TOKENIZER_FILES):
        raise RouterError(
            f"gate_mode {config.gate_mode} tokenizes the prompts, but the base model has no tokenizer"
        )
    return layout


def output_bytes(config: MoeConfig, base_dir: Path) -> int:
    """Bytes of the output's weights: non-MLP tensors once, MLP tensors once per expert (shared included)."""
    dtype = DTYPES[config.dtype] if config.dtype else None
    copies = len(config.experts) + len(config.shared_experts or [])
    size = 0
    for name, entry in TensorReader(base_dir).entries.items():
        itemsize = (dtype if dtype is not None and entry.dtype.is_floating_point else entry.dtype).itemsize
        size += entry.numel * itemsize * (copies if is_mlp(name) else 1)
    return size


def _output_dtype(config: MoeConfig, base: dict) -> torch.dtype | None:
    """`dtype` of the recipe, else the base config's (mergekit's select_dtype)."""
    name = config.dtype or base.get("dtype") or base.get("torch_dtype")
    return DTYPES.get(name) if isinstance(name, str) else None


def _perturb(tensor: torch.Tensor, expert: Expert, name: str, index: int, seed: int) -> torch.Tensor:
    """mergekit's noise_and_scale: + N(0, noise_scale^2) noise (seeded here), down_proj x residual_scale."""
    if expert.noise_scale is not None:
        generator = torch.Generator().manual_seed(tensor_seed(seed, name, index))
        noise = torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype)
        tensor = tensor + noise.to(tensor.device) * expert.noise_scale
    if "down_proj" in name and expert.residual_scale is not None:
        tensor = tensor * expert.residual_scale
    return tensor


def build_moe(
    config: MoeConfig,
    paths: dict[str, Path],
    out_dir: Path,
    *,
    device: torch.device | None = None,
    max_shard_bytes: int = 2 << 30,
    progress: Progress | None = None,
) -> MoeResult:
    """Write the MoE model described by `config` (references resolved to directories by `paths`)."""
    start = time.perf_counter()
    device = device or default_device()
    layout = check_moe_inputs(config, paths)
    base_dir = paths[config.base_model]
    base_json = read_config(base_dir)
    base_config = AutoConfig.from_pretrained(base_dir)
    num_layers, hidden = int(base_config.num_hidden_layers), int(base_config.hidden_size)
    out_dtype = _output_dtype(config, base_json)

    if progress:
        progress(0, 1, f"router weights ({config.gate_mode})")
    routers = router_rows(config, base_dir, num_layers, hidden, device)

    refs = config.input_models
    readers = {ref: TensorReader(paths[ref]) for ref in refs}
    try:
        base_reader = readers[config.base_model]
        owners = dict(enumerate(config.experts))
        if config.shared_experts:
            owners[-1] = config.shared_experts[0]

        def base_tensor(name: str) -> torch.Tensor:
            return base_reader.map(name)

        def expert_tensor(index: int, name: str) -> torch.Tensor:
            expert = owners[index]
            return _perturb(readers[expert.source_model].map(name), expert, name, index, config.seed)

        entries = {name: (e.dtype, e.shape) for name, e in base_reader.entries.items()}
        plan = plan_tensors(
            layout, config, entries, num_layers, routers, out_dtype, base_tensor, expert_tensor
        )
        writer = ShardedWriter(
            out_dir, [PlannedTensor(t.name, t.dtype, t.shape) for t in plan], max_shard_bytes
        )
        try:
            for i, item in enumerate(plan):
                tensor = item.make()
                if tuple(tensor.shape) != item.shape:
                    raise ValueError(
                        f"{item.name}: made shape {list(tensor.shape)}, planned {list(item.shape)}"
                    )
                writer.write(item.name, tensor)
                del tensor
                if progress:
                    progress(i + 1, len(plan), f"{i + 1}/{len(plan)} tensors written")
            writer.close()
        except BaseException:
            writer.abort()
            raise
    finally:
        for reader in readers.values():
            reader.close()

    output_config(layout, base_config, config, out_dtype).save_pretrained(out_dir)
    copy_tokenizer(base_dir, out_dir)
    written = sum((out_dir / f).stat().st_size for f in writer.files)
    return MoeResult(
        layout, len(config.experts), len(plan), written, time.perf_counter() - start, str(device)
    )
