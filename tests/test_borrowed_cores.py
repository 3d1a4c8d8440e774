"""A job borrows the inference workers' cores while none of them generates, and gives them back at once."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from redis import Redis
from rq.registry import StartedJobRegistry

from tests.tiny_models import make_tiny_chat_llama
from workers.generation.engine import GenerationRequest
from workers.inference.activity import SERVING_KEY, clear_serving, inference_busy, mark_serving
from workers.inference.protocol import QUEUE_KEY, InferenceJob
from workers.inference.worker import InferenceWorker
from workers.jobs.borrowed_cores import BORROW_KEY, CoreBorrower, background_running
from workers.jobs.queues import BACKGROUND_QUEUE_NAME
from workers.threads import borrowable, held_threads, set_threads


@pytest.fixture
def redis(isolated_redis_url) -> Redis:
    return Redis.from_url(isolated_redis_url)


def _computing_until(condition, timeout: float = 5.0) -> bool:
    """Run torch work on this (main) thread until `condition()` holds, as a job does (False: timed out)."""
    a, b = torch.randn(64, 64), torch.randn(64, 64)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        a @ b
        if condition():
            return True
    return False


def test_inference_counts_as_busy_while_a_worker_is_marked_or_a_request_waits(redis):
    assert not inference_busy(redis)
    mark_serving(redis, "w1")
    assert inference_busy(redis)
    clear_serving(redis, "w1")
    assert not inference_busy(redis)
    mark_serving(redis, "dead", now=time.time() - 60)  # a worker that died mid-batch: its mark lapsed
    assert not inference_busy(redis) and redis.zcard(SERVING_KEY) == 1
    redis.rpush(QUEUE_KEY, "{}")
    assert inference_busy(redis)


def test_a_job_runs_on_the_borrowed_threads_while_inference_is_idle_and_gives_them_back(redis):
    start = torch.get_num_threads()
    borrower = CoreBorrower(redis, "job-1", own=1, extra=2, poll_s=0.02)
    set_threads(1)
    try:
        assert borrower.start()
        assert _computing_until(lambda: torch.get_num_threads() == 3)
        assert redis.get(BORROW_KEY) == b"job-1"
        mark_serving(redis, "w1")  # a request is being generated
        assert _computing_until(lambda: torch.get_num_threads() == 1)
        assert redis.get(BORROW_KEY) is None  # another job may not take them either
        clear_serving(redis, "w1")
        assert _computing_until(lambda: torch.get_num_threads() == 3)
    finally:
        borrower.stop()
        set_threads(start)
    assert torch.get_num_threads() == start and redis.get(BORROW_KEY) is None


def test_one_job_borrows_at_a_time(redis):
    first = CoreBorrower(redis, "job-1", own=1, extra=1)
    second = CoreBorrower(redis, "job-2", own=1, extra=1)
    assert first.wanted() == 2 and second.wanted() == 1
    redis.delete(BORROW_KEY)  # the first job ended (or its key lapsed)
    assert second.wanted() == 2 and first.wanted() == 1


def test_no_job_borrows_while_a_background_profile_runs(redis):
    """The niced background worker has the inference cores while it profiles (a live started-registry entry
    of its queue); an entry whose heartbeat lapsed does not count."""
    borrower = CoreBorrower(redis, "job-1", own=1, extra=1)
    key = StartedJobRegistry(BACKGROUND_QUEUE_NAME, connection=redis).key
    redis.zadd(key, {"profile-job:execution": time.time() + 60})
    assert background_running(redis) and borrower.wanted() == 1
    redis.zadd(key, {"profile-job:execution": time.time() - 1})
    assert not background_running(redis) and borrower.wanted() == 2


def test_the_count_is_changed_only_on_the_computing_thread(redis):
    """torch's thread count is the calling thread's: the watcher must not set it from its own thread."""
    seen: list[int] = []
    borrower = CoreBorrower(redis, "job-1", own=1, extra=1, poll_s=0.02)
    set_threads(1)
    try:
        worker = threading.Thread(target=lambda: seen.append(borrower.start()))
        worker.start()
        worker.join()
        assert seen == [False]  # only a main thread can take the interrupt
    finally:
        borrower.stop()


def test_a_held_count_wins_over_borrowing_until_its_block_ends():
    start = torch.get_num_threads()
    try:
        set_threads(1)
        with held_threads(2):
            set_threads(3)  # what the borrower asks meanwhile
            assert torch.get_num_threads() == 2
        assert torch.get_num_threads() == 3
        with held_threads(None):
            assert torch.get_num_threads() == 3
    finally:
        set_threads(start)


@pytest.mark.parametrize(
    "own, infer, workers, cores, expected",
    [(1, 1, 1, 2, 1), (8, 8, 1, 16, 8), (4, 8, 1, 8, 4), (2, 1, 1, 2, 0), (1, 0, 0, 4, 0)],
)
def test_a_job_worker_borrows_the_inference_threads_within_the_cores(own, infer, workers, cores, expected):
    assert borrowable(own, infer, workers, cores) == expected


def test_an_inference_worker_is_busy_exactly_while_it_serves_a_batch(tmp_path, redis):
    """Its mark is set before the engine loads and cleared when the batch is done; a heartbeat during the
    batch renews it, one after leaves it cleared."""
    make_tiny_chat_llama(tmp_path / "tiny", seed=5)
    worker = InferenceWorker(redis, tmp_path, precision="float32")
    seen: list[bool] = []
    serve_group = worker.serve_group

    def observed(model_id, jobs):
        worker._publish()  # a heartbeat while generating
        seen.append(inference_busy(redis))
        serve_group(model_id, jobs)

    worker.serve_group = observed
    request = GenerationRequest(prompt_ids=[5, 6, 7], depth=2, max_new_tokens=3, ignore_eos=True)
    worker.serve_batch([InferenceJob(model="tiny", request=request)])
    worker._publish()
    assert seen == [True] and not inference_busy(redis)
