"""Every row's own low-rank delta in one compiled call per linear layer (`lowrank_rows.cpp`), for batches
that mix variants of a quantised base (workers.generation.deltas.Int8Stack).

The torch formulation of the same sum, two int8 products and a mask per layer, spends its time in per-call
overhead at decode batch sizes (about 35 us a layer call on the 2-core CPU); the compiled loop reads each
row's own factors once (about 9 us). Built with torch's C++ extension loader once per machine (about 20 s):
by `make install` (`python -m workers.generation.lowrank_kernel`), else when an inference worker on a
quantised CPU engine starts, or at first use; kept as one file under TORCH_EXTENSIONS_DIR (else
~/.cache/torch_extensions)/strata, named by a hash of the source, torch's version, the flags and the CPU's
instruction-set flags (it is compiled for this CPU). Where it cannot be
built (no compiler) or STRATA_LOWRANK_KERNEL=0, `lowrank_kernel()` is None and the torch products serve.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import importlib.util
import logging
import os
import platform
import tempfile
import threading
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("lowrank_rows.cpp")
log = logging.getLogger(__name__)
_lock = threading.Lock()
_built: dict[str, object] = {}


def _cpu_tag() -> str:
    """A short hash of the machine type and its CPU flags (a build for one CPU may not run on another)."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line
                break
    except OSError:
        pass
    return hashlib.sha256(f"{platform.machine()} {flags}".encode()).hexdigest()[:10]


def lowrank_kernel():
    """The compiled module (with `lowrank_rows`, `lowrank_embed`), loaded or built once per process; None
    where it is off or cannot be built, or (asked again later) while another process builds it."""
    with _lock:
        if "module" not in _built:
            module, final = _load_or_build()
            if not final:
                return None
            _built["module"] = module
        return _built["module"]


FLAGS = ["-O3", "-march=native", "-ffast-math"]


@functools.cache
def _module_name() -> str:
    """The build's name: a hash of the source, torch's version, the flags and the CPU (read once)."""
    key = f"{SOURCE.read_text()}{torch.__version__}{FLAGS}{_cpu_tag()}"
    return f"strata_lowrank_rows_{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def build_place() -> tuple[str, Path]:
    """(module name, folder) of this machine's build."""
    extensions = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions"
    return _module_name(), Path(extensions) / "strata"


def _load_or_build() -> tuple[object, bool]:
    """(module or None, whether that is final). One process builds at a time: it holds an exclusive
    `flock` on a lock file beside the build (released by the kernel if the process dies, so a build
    killed halfway stops nobody); another process meanwhile gets (None, False) at once and serves with
    torch's products until the file is there."""
    if os.environ.get("STRATA_LOWRANK_KERNEL", "1") == "0":
        return None, True
    name, root = build_place()
    built = root / f"{name}.so"
    try:
        if built.is_file():
            return _import(name, built), True
        root.mkdir(parents=True, exist_ok=True)
        with open(root / f"{name}.lock", "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return None, False  # another process is building it
            if built.is_file():  # built while this one waited for the lock
                return _import(name, built), True
            from torch.utils.cpp_extension import load

            with tempfile.TemporaryDirectory(dir=root) as tmp:  # torch's own lock file stays private
                module = load(name, [str(SOURCE)], extra_cflags=FLAGS, build_directory=tmp, verbose=False)
                os.replace(Path(tmp) / f"{name}.so", built)
            return module, True
    except Exception as error:  # no compiler or ninja, a failed build: the torch products serve
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        log.warning("the low-rank delta kernel could not be built (%s); torch's int8 products serve", reason)
        return None, True


def _import(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


class KernelPlan:
    """A layer's int8 low-rank deltas for one batch in the kernel's terms (lowrank_rows.cpp): rank
    directions j (rows of `a`, scales sa, sb), each with its int8 column at bvals[bstart[j]:][:width[j]]
    placed at output offset off[j]; request row r uses directions c0[r]..c1[r] - 1 (none for the base's
    rows). The kernel checks every bound of the plan before it reads."""

    def __init__(self, module, tensors: tuple[torch.Tensor, ...], out_features: int) -> None:
        self.module, self.tensors, self.out_features = module, tensors, out_features

    @staticmethod
    def build(
        module,
        row_ranges: list[tuple[int, int]],
        parts: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]],
        out_features: int,
    ) -> KernelPlan:
        """From the batch rows' direction ranges and the parts side by side: (offset, qa (r x in),
        sa (r), qbt (r x width, contiguous), sb (r)) each, in the order the ranges count them."""
        bvals, bstart, off, width, start = [], [], [], [], 0
        for offset, _, _, qbt, _ in parts:
            rank, w = qbt.shape
            bvals.append(qbt.reshape(-1))
            bstart += [start + k * w for k in range(rank)]
            off += [offset] * rank
            width += [w] * rank
            start += rank * w
        ints = bstart + off + width + [lo for lo, _ in row_ranges] + [hi for _, hi in row_ranges]
        scales = torch.cat([torch.cat([p[2] for p in parts]), torch.cat([p[4] for p in parts])])
        tensors = (
            torch.cat([p[1] for p in parts]).contiguous(),
            torch.cat(bvals),
            torch.tensor(ints, dtype=torch.long),
            scales.float().contiguous(),
        )
        return KernelPlan(module, tensors, out_features)

    def applies(self, y: torch.Tensor, x: torch.Tensor) -> bool:
        """Whether `add` takes these (the kernel checks every size itself)."""
        return (
            x.dtype is torch.bfloat16
            and y.dtype is torch.bfloat16
            and y.is_contiguous()
            and x.shape[:-1] == y.shape[:-1]
            and y.shape[-1] == self.out_features
        )

    def add(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """y += every row's own delta of x, in place (`applies` must hold)."""
        q = x.shape[1] if x.dim() == 3 else 1
        flat = x.reshape(-1, x.shape[-1]).contiguous()
        self.module.lowrank_rows(y.view(-1, self.out_features), flat, *self.tensors, q)
        return y

    def add_rows(self, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """hidden (rows, q, H) += every row's own embedding delta at token ids (rows, q), in place; the
        plan's parts are embedding deltas (offset 0, width the vocabulary)."""
        flat = hidden.view(-1, hidden.shape[-1])
        self.module.lowrank_embed(flat, ids.reshape(-1).contiguous(), *self.tensors, ids.shape[-1])
        return hidden


if __name__ == "__main__":  # `make install`: build it now, not when the first variants are served
    logging.basicConfig(level=logging.WARNING)
    print("low-rank delta kernel:", "ready" if lowrank_kernel() is not None else "not built (torch serves)")
