"""Build and load the engine's C++ sources once per machine, with torch's C++ extension loader.

Each source is kept as one file under TORCH_EXTENSIONS_DIR (else ~/.cache/torch_extensions)/strata, named
by a hash of the source, torch's version, the flags and the CPU's instruction-set flags (it is compiled for
this CPU, with OpenMP so that its parallel loops use torch's threads). `make install` builds them
(`python -m workers.generation.cpp_build`); else the first process that asks does (about 20-30 s each).
Where one cannot be built (no compiler), or its switch-off variable is 0, `compiled()` is None and the
torch operations it replaces serve.
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
from types import ModuleType

import torch

log = logging.getLogger(__name__)
_locks: dict[str, threading.Lock] = {}  # one per source: one build never waits for another's
_locks_lock = threading.Lock()
_built: dict[str, ModuleType | None] = {}
FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp"]


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


@functools.cache
def _module_name(source: Path) -> str:
    """The build's name: a hash of the source, torch's version, the flags and the CPU (read once)."""
    headers = "".join(h.read_text() for h in sorted(source.parent.glob("*.h")))  # what it may include
    key = f"{source.read_text()}{headers}{torch.__version__}{FLAGS}{_cpu_tag()}"
    return f"strata_{source.stem}_{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def build_place(source: Path) -> tuple[str, Path]:
    """(module name, folder) of this machine's build of `source`."""
    extensions = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions"
    return _module_name(source), Path(extensions) / "strata"


def compiled(source: Path, switch: str) -> ModuleType | None:
    """The compiled module of `source`, loaded or built once per process; None where the environment
    variable `switch` is 0, where it cannot be built, or (asked again later) while another process builds
    it."""
    with _locks_lock:
        lock = _locks.setdefault(str(source), threading.Lock())
    with lock:
        if str(source) not in _built:
            module, final = load_or_build(source, switch)
            if not final:
                return None
            _built[str(source)] = module
        return _built[str(source)]


def decided(source: Path) -> bool:
    """Whether `compiled(source, ...)` has a final answer in this process."""
    return str(source) in _built


def load_or_build(source: Path, switch: str) -> tuple[ModuleType | None, bool]:
    """(module or None, whether that is final). One process builds at a time: it holds an exclusive
    `flock` on a lock file beside the build (released by the kernel if the process dies, so a build
    killed halfway stops nobody); another process meanwhile gets (None, False) at once and serves with
    torch's operations until the file is there."""
    if os.environ.get(switch, "1") == "0":
        return None, True
    name, root = build_place(source)
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
                module = load(
                    name,
                    [str(source)],
                    extra_cflags=FLAGS,
                    extra_ldflags=["-fopenmp"],
                    build_directory=tmp,
                    verbose=False,
                )
                os.replace(Path(tmp) / f"{name}.so", built)
            return module, True
    except Exception as error:  # no compiler or ninja, a failed build: torch's operations serve
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        log.warning("%s could not be built (%s); torch's operations serve", source.name, reason)
        return None, True


def _import(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


if __name__ == "__main__":  # `make install`: build them now, not when the first request is served
    logging.basicConfig(level=logging.WARNING)
    from workers.generation.decode_kernel import decode_kernel
    from workers.generation.lowrank_kernel import lowrank_kernel

    print("low-rank delta kernel:", "ready" if lowrank_kernel() is not None else "not built (torch serves)")
    print("decode kernels:", "ready" if decode_kernel() is not None else "not built (torch serves)")
