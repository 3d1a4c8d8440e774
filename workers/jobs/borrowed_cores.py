"""A job borrows the inference workers' cores while none of them is generating.

`strata serve` gives job and inference workers their own threads (`workers/threads.py`: 1 and 1 on two
cores), so a long job (an exit fit, a merge, a profile) used to leave the inference worker's core idle for
as long as nobody generated. Now, while no inference worker is generating and no request waits
(`workers.inference.activity`), one job at a time (the holder of BORROW_KEY, renewed while it borrows)
computes on its own threads plus the inference workers' (STRATA_BORROW_THREADS); as soon as one is
generating, it gives them back. Nor does it borrow while the background worker (niced, one thread) runs a
profile: that profile has those cores then.

A watcher thread asks Redis every POLL_S. torch's thread count belongs to the thread that computes (OpenMP
keeps it per thread), so the watcher only decides: it interrupts the job's main thread with BORROW_SIGNAL
(`_thread.interrupt_main`: no OS signal is sent, nothing is cut short) and the handler applies the count
there, between two Python bytecodes, that is after the torch operation running then (at most a few
hundred ms in the fitting loops). Until then a request that has just started shares the cores with the
job's extra threads; `bench/borrowed_cores.py` measures what that costs a request.
"""

from __future__ import annotations

import _thread
import logging
import signal
import threading
import time
from types import FrameType

from redis import Redis
from redis.exceptions import RedisError
from rq.registry import StartedJobRegistry

from workers.inference.activity import inference_busy
from workers.jobs.queues import BACKGROUND_QUEUE_NAME
from workers.threads import borrow_budget, own_budget, set_threads

log = logging.getLogger(__name__)

BORROW_KEY = "strata:jobs:borrowing"  # the job that borrows the inference cores now
BORROW_TTL_MS = 2000  # the holder renews it every POLL_S; a killed holder's lapses
POLL_S = 0.1
BORROW_SIGNAL = signal.SIGUSR2

TAKE = """
local holder = redis.call('GET', KEYS[1])
if holder == false or holder == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def background_running(redis: Redis) -> bool:
    """The background worker is running a job (its RQ started-registry has a live entry)."""
    key = StartedJobRegistry(BACKGROUND_QUEUE_NAME, connection=redis).key
    return bool(redis.zcount(key, f"({time.time()}", "+inf"))


class CoreBorrower:
    """While running a job: its own `own` threads, plus `extra` while inference is idle and it holds the
    borrowing key."""

    def __init__(self, redis: Redis, owner: str, own: int, extra: int, poll_s: float = POLL_S) -> None:
        self.redis, self.owner, self.own, self.extra, self.poll_s = redis, owner, own, extra, poll_s
        self.threads = own  # the count the watcher wants the main thread on
        self.changes = 0  # times it asked for another count
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self._previous: signal.Handlers | object | None = None

    def start(self) -> bool:
        """Watch from now on (True), unless there is nothing to borrow or this is not the main thread."""
        if self.extra < 1 or threading.current_thread() is not threading.main_thread():
            return False
        self._previous = signal.signal(BORROW_SIGNAL, self._apply)
        self._watcher = threading.Thread(target=self._watch, name="strata-borrow", daemon=True)
        self._watcher.start()
        return True

    def stop(self) -> None:
        """Stop watching, give back what was borrowed and the key."""
        if self._watcher is None:
            return
        self._stop.set()
        self._watcher.join()
        self._watcher = None
        self.threads = self.own
        set_threads(self.own)
        signal.signal(BORROW_SIGNAL, self._previous if self._previous is not None else signal.SIG_DFL)
        try:
            self.redis.eval(RELEASE, 1, BORROW_KEY, self.owner)
        except RedisError:
            pass  # it lapses by itself

    def wanted(self) -> int:
        """The threads to run on now (asks Redis; gives the key back while inference is busy, or a background
        profile runs: the niced background worker has those cores then)."""
        if inference_busy(self.redis) or background_running(self.redis):
            self.redis.eval(RELEASE, 1, BORROW_KEY, self.owner)
            return self.own
        holds = self.redis.eval(TAKE, 1, BORROW_KEY, self.owner, BORROW_TTL_MS)
        return self.own + self.extra if holds else self.own

    def _watch(self) -> None:
        while not self._stop.is_set():
            try:
                threads = self.wanted()
            except RedisError as e:  # no word from Redis: own threads only
                log.warning("core borrowing paused: %s", type(e).__name__)
                threads = self.own
            if threads != self.threads:
                self.threads = threads
                self.changes += 1
                _thread.interrupt_main(BORROW_SIGNAL)
            self._stop.wait(self.poll_s)

    def _apply(self, signum: int, frame: FrameType | None) -> None:
        set_threads(self.threads)


def job_borrower(redis: Redis, owner: str) -> CoreBorrower:
    """The borrower of a job worker started by `strata serve` (nothing to borrow elsewhere)."""
    return CoreBorrower(redis, owner, own_budget() or 1, borrow_budget())
