"""The CPU decode step's compiled kernels (`decode_kernels.cpp`): the int8 and int4 products with
activations quantised per block of 16 and multiplied as integers (AVX-512 VNNI, as llama.cpp's Q8_0 and
Q4_1 do), the int4 packing they read, and a model's decoder layers as one call.

Built once per machine (workers.generation.cpp_build). Where it cannot be built (no compiler), or with
STRATA_DECODE_KERNEL=0, torch's operations serve; on a CPU without AVX-512 VNNI only the layers' call is
used. While another process builds it, `decode_kernel()` is None and is asked again later, so a model
loaded in that window keeps torch's products for its life.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

from workers.generation import cpp_build

SOURCE = Path(__file__).with_name("decode_kernels.cpp")
SWITCH = "STRATA_DECODE_KERNEL"


def decode_kernel() -> ModuleType | None:
    """The compiled module (`int8_mm`, `int4_mm`, `int4_pack`, `Stack`, `has_vnni`), or None (see the
    module's text)."""
    return cpp_build.compiled(SOURCE, SWITCH)


def vnni_kernel() -> ModuleType | None:
    """The compiled module where its integer products (`int8_mm`, `int4_mm`) run on this CPU, else None."""
    module = decode_kernel()
    return module if module is not None and module.has_vnni else None


def decode_kernel_decided() -> bool:
    """Whether `decode_kernel()`'s answer is final (loaded, off, or failed to build), not None only while
    another process builds it."""
    return cpp_build.decided(SOURCE)
