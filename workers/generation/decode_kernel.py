"""The CPU decode step's compiled kernels (`decode_kernels.cpp`): the int8 product with activations
quantised per block of 32 (AVX-512 VNNI, as llama.cpp's Q8_0), and a model's decoder layers as one call.

Built once per machine (workers.generation.cpp_build). Where it cannot be built (no compiler), where this
CPU lacks AVX-512 VNNI (then only the layers' call is used), or with STRATA_DECODE_KERNEL=0,
torch's operations serve.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

from workers.generation import cpp_build

SOURCE = Path(__file__).with_name("decode_kernels.cpp")
SWITCH = "STRATA_DECODE_KERNEL"


def decode_kernel() -> ModuleType | None:
    """The compiled module (`int8_mm`, `Stack`, `has_int8_vnni`), or None (see the module's text)."""
    return cpp_build.compiled(SOURCE, SWITCH)


def int8_kernel() -> ModuleType | None:
    """The compiled module where its int8 product runs on this CPU, else None."""
    module = decode_kernel()
    return module if module is not None and module.has_int8_vnni else None
