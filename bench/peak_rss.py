"""A process's own peak resident memory, for benches that measure each engine in a process of its own.

Standard library only: llama.cpp's driver (bench/llamacpp_driver.py) imports it in llama.cpp's own
virtual environment, Strata's side (bench/decode_parity.py) in the project's."""

from __future__ import annotations

import resource


def _status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def rss_mb() -> float | None:
    """The process's resident memory now (VmRSS), None where /proc is missing."""
    return _status_mb("VmRSS:")


def peak_rss_mb() -> float:
    """VmHWM of /proc/self/status, which starts afresh at exec (ru_maxrss does not: Linux starts a child's
    at the RSS of the process that forked it, e.g. the gigabytes of a bench), else ru_maxrss."""
    peak = _status_mb("VmHWM:")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
