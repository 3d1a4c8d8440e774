"""Child processes of `strata serve` (workers, the embedded Redis) must not outlive it."""

from __future__ import annotations

import ctypes
import signal
import sys


def die_with_parent() -> None:
    """Run in the child (Popen's preexec_fn): receive SIGTERM when the parent dies, even by SIGKILL."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
