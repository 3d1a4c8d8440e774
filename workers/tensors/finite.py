"""Whether a model directory's floating tensors hold only finite numbers (no NaN, no inf)."""

from __future__ import annotations

import math
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
                if not _finite(flat[start : start + CHUNK]):
                    return name
    return None


def _finite(values: torch.Tensor) -> bool:
    """No NaN (min and max propagate it) and no inf: one reduction pass and no boolean temporary, 8x
    faster than isfinite().all() on the CPU."""
    low, high = torch.aminmax(values)
    return bool(low > -math.inf) and bool(high < math.inf)
