"""Fine-tune-like variants of a model, for synthetic tests, demos and benchmarks of speed and exactness.

Their deltas are random noise: a variant has learned nothing, so a merge of variants says nothing about what
a merge keeps. For real variants fine-tune (the `finetune` job, /v1/fine_tuning/jobs); for merges judged by
what they keep, bench/merge_quality.py.

theta' = theta + delta, tensor by tensor, with rms(delta) = scale * rms(theta):
- dense:    delta = scale * rms(theta) * Z,                      Z ~ N(0, 1)
- low rank: delta = scale * rms(theta) * A B / sqrt(r),          A, B ~ N(0, 1), r = rank (2-D tensors only)
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from workers.merge.executor import copy_tokenizer, tensor_seed
from workers.store.model_files import contained
from workers.tensors.safetensors_io import PlannedTensor, ShardedWriter, TensorReader


def random_low_rank_factors(
    shape: tuple[int, int], rms: float, scale: float, rank: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(left, right) with delta = left @ right, the low-rank delta of a 2-D tensor of this shape and rms
    (module docstring)."""
    a = torch.randn(shape[0], rank, generator=generator)
    b = torch.randn(rank, shape[1], generator=generator)
    return scale * rms * a / rank**0.5, b


def perturbation(
    theta: torch.Tensor, scale: float, rank: int | None, generator: torch.Generator
) -> torch.Tensor:
    rms = float(theta.float().pow(2).mean().sqrt())
    if rank and theta.dim() == 2:
        left, right = random_low_rank_factors(tuple(theta.shape), rms, scale, rank, generator)
        return left @ right
    return scale * rms * torch.randn(theta.shape, generator=generator)


def make_variant(
    source: Path,
    out_dir: Path,
    *,
    seed: int,
    scale: float = 1e-3,
    rank: int | None = None,
    max_shard_bytes: int = 2 << 30,
    progress: Callable[[int, int, str], None] | None = None,
) -> None:
    with TensorReader(source) as reader:
        entries = reader.entries
        writer = ShardedWriter(
            out_dir, [PlannedTensor(n, e.dtype, e.shape) for n, e in entries.items()], max_shard_bytes
        )
        for i, (name, entry) in enumerate(entries.items()):
            theta = reader.load(name)
            if entry.dtype.is_floating_point:
                generator = torch.Generator().manual_seed(tensor_seed(seed, name, 0))
                theta = (theta.float() + perturbation(theta, scale, rank, generator)).to(entry.dtype)
            writer.write(name, theta)
            if progress:
                progress(i + 1, len(entries), f"{i + 1}/{len(entries)} tensors")
        writer.close()
    shutil.copyfile(contained(source, "config.json"), out_dir / "config.json")
    copy_tokenizer(source, out_dir)
