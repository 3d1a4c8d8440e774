"""Thread budgets: how many cores each worker process may use, so co-located workers never oversubscribe.

On a machine with C usable cores, running J job workers and I inference workers, the default budget gives
inference workers half the cores (at least one each) and job workers the rest (at least one each):

    inference threads = max(1, ceil(C / 2) // I),   job threads = max(1, (C - I * inference threads) // J)

(on 2 cores with one of each: 1 and 1). An idle OpenMP thread spins only briefly before it sleeps
(`GOMP_SPINCOUNT`, 20,000 spins, tens of microseconds), so it does not hold a core its neighbour process
needs, yet stays awake between the many small parallel regions of one decode step: fully passive waiting
(`OMP_WAIT_POLICY=PASSIVE`) cost 40% of the decoding speed on 2 threads here (57 -> 34 tok/s, int4,
depth 30), the short spin nothing (62). Both must be in the environment before the process imports torch,
so the parent sets them when it starts a worker (`worker_environment`).

Borrowing. A user job worker may also run on the inference workers' cores while none of them is generating
(`workers/jobs/borrowed_cores.py` decides when; one job worker at a time): `worker_environment` tells it how
many threads it may add (STRATA_BORROW_THREADS) and how many an inference worker decodes with
(STRATA_INFER_THREADS, at which a profile times its latency: `held_threads`). torch keeps the thread count
per calling thread (OpenMP's nthreads is a per-thread setting), so only the thread that computes can change
its own: `set_threads` from that thread, never from a watcher.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

SPIN_COUNT = 20_000  # libgomp: spins before an idle thread sleeps
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")
OWN_VARIABLE = "STRATA_THREADS"  # a worker's own threads
BORROW_VARIABLE = "STRATA_BORROW_THREADS"  # threads a job worker may add while inference is idle
SERVING_VARIABLE = "STRATA_INFER_THREADS"  # threads an inference worker decodes with


class _Counts(threading.local):  # per thread, as torch's own count is
    def __init__(self) -> None:
        self.held: list[int] = []  # counts held by `held_threads`, innermost last
        self.wanted: int | None = None  # the count `set_threads` asked for last (applied once none is held)


_counts = _Counts()


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def default_budgets(job_workers: int, infer_workers: int, cores: int | None = None) -> tuple[int, int]:
    """(threads per job worker, threads per inference worker) that split `cores` between them."""
    cores = cores or usable_cores()
    if not infer_workers:
        return max(1, cores // max(1, job_workers)), 0
    if not job_workers:
        return 0, max(1, cores // infer_workers)
    infer = max(1, math.ceil(cores / 2) // infer_workers)
    return max(1, (cores - infer * infer_workers) // job_workers), infer


def worker_environment(threads: int, borrow: int = 0, serving: int | None = None) -> dict[str, str]:
    """Environment variables that hold a child process to `threads` threads, spinning only briefly; a job
    worker may add `borrow` threads while inference is idle, and times latency at `serving` threads."""
    if threads < 1 or borrow < 0 or (serving is not None and serving < 1):
        raise ValueError(f"thread budgets must be >= 1 (borrowed >= 0), got {threads}, {borrow}, {serving}")
    env = dict.fromkeys(THREAD_VARIABLES, str(threads))
    env["GOMP_SPINCOUNT"] = str(SPIN_COUNT)
    env[OWN_VARIABLE] = str(threads)
    env[BORROW_VARIABLE] = str(borrow)
    if serving is not None:
        env[SERVING_VARIABLE] = str(serving)
    return env


def borrowable(own: int, infer_threads: int, infer_workers: int, cores: int | None = None) -> int:
    """Threads a job worker of `own` threads may add while no inference worker generates: the inference
    workers' threads, never beyond the usable cores."""
    cores = cores or usable_cores()
    return max(0, min(infer_threads * infer_workers, cores - own))


def _env_count(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    return int(value) if value.isdigit() else None


def own_budget() -> int | None:
    """This worker's own thread budget (STRATA_THREADS), None unset."""
    return _env_count(OWN_VARIABLE)


def borrow_budget() -> int:
    """Threads this worker may add while inference is idle (STRATA_BORROW_THREADS; 0 unset)."""
    return _env_count(BORROW_VARIABLE) or 0


def serving_threads() -> int | None:
    """Threads an inference worker decodes with (STRATA_INFER_THREADS), None unknown."""
    count = _env_count(SERVING_VARIABLE)
    return count if count else None


def set_threads(threads: int) -> None:
    """Run torch on `threads` intra-op threads from now on, in the calling thread (at once unless a
    `held_threads` block holds another count: then when the last one ends)."""
    import torch

    _counts.wanted = max(1, threads)
    if not _counts.held and torch.get_num_threads() != _counts.wanted:
        torch.set_num_threads(_counts.wanted)


@contextmanager
def held_threads(threads: int | None) -> Iterator[None]:
    """torch on `threads` threads for the block, whatever `set_threads` asks meanwhile (None: as it is)."""
    import torch

    if threads is None:
        yield
        return
    held = _counts.held
    if _counts.wanted is None:
        _counts.wanted = torch.get_num_threads()
    held.append(max(1, threads))
    torch.set_num_threads(held[-1])
    try:
        yield
    finally:
        held.pop()
        torch.set_num_threads(held[-1] if held else _counts.wanted)


def apply_budget(threads: int | None = None) -> int:
    """Hold torch in this process to `threads` intra-op threads (default: STRATA_THREADS, else leave it)."""
    import torch

    if threads is None:
        value = os.environ.get(OWN_VARIABLE)
        if not value:
            return torch.get_num_threads()
        threads = int(value)
    torch.set_num_threads(max(1, threads))
    return torch.get_num_threads()


def rebuild_after_fork() -> None:
    """Call first thing in a forked child (an RQ work horse), on its one thread.

    torch marks its thread pool corrupt in a forked child and rebuilds it in the next set_num_threads,
    which every new thread calls on its first torch op. Several threads doing that at once (transformers
    loads weights with a thread pool) raced and failed with "Invalid thread pool!"; rebuilt here, they
    find it whole."""
    import torch

    torch.set_num_threads(torch.get_num_threads())
