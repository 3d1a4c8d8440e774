"""Process liveness and lifetime helpers (Linux semantics, harmless elsewhere)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
from pathlib import Path

import psutil


def die_with_parent() -> None:
    """Run in a child (Popen's preexec_fn, or right after fork): get SIGTERM when the parent dies, even by
    SIGKILL, so workers and the embedded Redis never outlive `strata serve`."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG


def process_alive(pid: int) -> bool:
    """Whether a process of this host runs; a zombie (dead, not yet reaped) counts as dead."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    if stat.exists():
        try:
            state = stat.read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return True
        return state not in ("Z", "X")
    return True


def kill_tree(pid: int) -> None:
    """SIGKILL a process and its descendants (a stopped process ignores SIGTERM until it is continued;
    its work-horse would get only that from die_with_parent)."""
    try:
        parent = psutil.Process(pid)
        family = [*parent.children(recursive=True), parent]
    except psutil.NoSuchProcess:
        return
    for process in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()


def return_freed_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc keeps freed blocks below its mmap threshold,
    so memory freed by dropping many mid-sized tensors would stay in the process's resident set)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
