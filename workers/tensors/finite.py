"""Whether a model directory's floating tensors hold only finite numbers (no NaN, no inf)."""

from __future__ import annotations

from pathlib import Path

import torch

from workers.tensors.safetensors_io import TensorReader

CHUNK = 1 << 22  # elements checked at a time: memory stays a few MiB whatever the tensor size


def first_non_finite(directory: Path) -> str | None:
    """The name of the first floating tensor holding a NaN or an inf, streaming tensor by tensor; None if
    every one is finite."""
    with TensorReader(directory) as reader:
        for name, entry in reader.entries.items():
            if not entry.dtype.is_floating_point or entry.numel == 0:
                continue
            flat = reader.map(name).view(-1)
            for start in range(0, flat.numel(), CHUNK):
                if not bool(torch.isfinite(flat[start : start + CHUNK]).all()):
                    return name
    return None
