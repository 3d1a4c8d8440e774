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
"""

from __future__ import annotations

import math
import os

SPIN_COUNT = 20_000  # libgomp: spins before an idle thread sleeps
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")


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


def worker_environment(threads: int) -> dict[str, str]:
    """Environment variables that hold a child process to `threads` threads, spinning only briefly."""
    if threads < 1:
        raise ValueError(f"a thread budget must be at least 1, got {threads}")
    env = dict.fromkeys(THREAD_VARIABLES, str(threads))
    env["GOMP_SPINCOUNT"] = str(SPIN_COUNT)
    env["STRATA_THREADS"] = str(threads)
    return env


def apply_budget(threads: int | None = None) -> int:
    """Hold torch in this process to `threads` intra-op threads (default: STRATA_THREADS, else leave it)."""
    import torch

    if threads is None:
        value = os.environ.get("STRATA_THREADS")
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
