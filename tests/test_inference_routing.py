"""Requests are routed to the inference worker that holds their base: two real workers serving two bases
(and a variant of one, stored as a delta) do not reload anything, and a killed worker's requests, queued or
being generated, are still answered by the others."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import redis

from service.generation.routing import SPILL_WAITING, Fleet, WorkerLoad, choose, enqueue, read_fleet
from tests.conftest import Server, start_server, stop_server
from tests.tiny_models import make_tiny_chat_llama, make_variant
from workers.generation.engine import GenerationRequest
from workers.inference.protocol import (
    EVENTS_PREFIX,
    QUEUE_KEY,
    InferenceJob,
    capacity_key,
    resident_key,
    worker_queue_key,
)
from workers.inference.worker import InferenceWorker


def fleet(*workers: tuple) -> Fleet:
    """Workers as (id, bases, waiting[, claimed[, capacity]])."""
    loads = tuple(
        WorkerLoad(
            w[0], frozenset(w[1]), w[2], frozenset(w[3] if len(w) > 3 else ()), w[4] if len(w) > 4 else 1
        )
        for w in workers
    )
    return Fleet(loads, sum(w.waiting for w in loads))


def test_a_base_goes_to_the_least_busy_worker_holding_it():
    f = fleet(("w1", {"a"}, 5), ("w2", {"b"}, 0), ("w3", {"a", "b"}, 2))
    assert choose("a", f) == ("w3", "affinity")
    assert choose("b", f) == ("w2", "affinity")


def test_a_new_base_goes_to_the_emptiest_worker_then_stays_there_while_it_loads():
    assert choose("c", fleet(("w1", {"a"}, 0), ("w2", set(), 3))) == ("w2", "new")  # fewest bases first
    # c is loading on w2 (claimed, not reported yet): its next requests follow it there
    assert choose("c", fleet(("w1", set(), 0), ("w2", set(), 1, {"c"}))) == ("w2", "assigned")
    # ... and the next new base goes to the other worker, though neither reports anything yet
    assert choose("d", fleet(("w1", set(), 1), ("w2", set(), 0, {"c"}))) == ("w1", "new")


def test_a_base_with_a_full_batch_waiting_everywhere_it_is_spreads_only_where_nothing_is_dropped():
    assert choose("a", fleet(("w1", {"a"}, SPILL_WAITING), ("w2", set(), 0))) == ("w2", "spilled")
    assert choose("a", fleet(("w1", {"a"}, SPILL_WAITING - 1), ("w2", set(), 0))) == ("w1", "affinity")
    # no worker holds nothing: it waits where it is rather than make another worker drop a base
    assert choose("a", fleet(("w1", {"a"}, 50), ("w2", {"b"}, 0))) == ("w1", "affinity")


def test_a_busy_base_spreads_to_a_worker_with_room_for_it_never_to_a_full_one():
    # w2 keeps two bases and holds one: taking a drops nothing there
    busy = ("w1", {"a"}, SPILL_WAITING, set(), 2)
    assert choose("a", fleet(busy, ("w2", {"b"}, 0, set(), 2))) == ("w2", "spilled")
    assert choose("a", fleet(busy, ("w2", {"b"}, 0, {"c"}, 2))) == ("w1", "affinity")  # full with a claim
    # of two workers with room, the one holding fewer
    assert choose("a", fleet(busy, ("w2", {"b"}, 0, set(), 4), ("w3", {"c", "d"}, 0, set(), 4))) == (
        "w2",
        "spilled",
    )


def test_a_new_base_goes_to_a_worker_with_room_before_a_full_one_that_holds_fewer():
    full, roomy = ("w1", {"a"}, 0, set(), 1), ("w2", {"b", "c"}, 5, set(), 4)
    assert choose("d", fleet(full, roomy)) == ("w2", "new")


def test_the_atomic_claim_in_redis_prefers_room_too_and_capacity_is_read_from_the_report(
    isolated_redis_url,
):
    conn = redis.Redis.from_url(isolated_redis_url)
    stale = fleet(("w1", {"a"}, 0, set(), 1), ("w2", {"b", "c"}, 5, set(), 4))
    assert enqueue(conn, stale, "d", "{}") == (worker_queue_key("w2"), "new")
    conn.set(resident_key("w3"), json.dumps({"x": {}}))
    conn.set(capacity_key("w3"), 3)
    conn.set(resident_key("w4"), json.dumps({}))  # an older worker that does not say: one base
    assert {(w.id, w.capacity) for w in read_fleet(conn, ["w3", "w4"]).workers} == {("w3", 3), ("w4", 1)}


def test_requests_routed_from_the_same_stale_view_still_see_each_others_claims(isolated_redis_url):
    conn = redis.Redis.from_url(isolated_redis_url)
    stale = fleet(("w1", set(), 0), ("w2", set(), 0))  # read by all three before any of them was routed
    assert enqueue(conn, stale, "a", "{}") == (worker_queue_key("w1"), "new")
    assert enqueue(conn, stale, "b", "{}") == (worker_queue_key("w2"), "new")
    assert enqueue(conn, stale, "a", "{}") == (worker_queue_key("w1"), "assigned")
    assert conn.llen(worker_queue_key("w1")) == 2 and conn.llen(worker_queue_key("w2")) == 1
    assert set(read_fleet(conn, ["w1"]).workers) == set()  # w1 writes no residency report: not routed to


def test_with_no_worker_reporting_the_shared_list_is_used():
    assert choose("a", fleet()) == (None, "shared")


def job(model: str) -> InferenceJob:
    return InferenceJob(model=model, request=GenerationRequest(prompt_ids=[5, 6], depth=2, max_new_tokens=2))


def test_a_worker_takes_what_was_routed_to_it_before_shared_requests_and_hands_back_the_rest(
    tmp_path, isolated_redis_url
):
    conn = redis.Redis.from_url(isolated_redis_url)
    worker = InferenceWorker(conn, tmp_path, max_batch_size=3)
    conn.rpush(QUEUE_KEY, job("shared-1").model_dump_json(), job("shared-2").model_dump_json())
    for name in ("own-1", "own-2"):
        conn.rpush(worker.queue, job(name).model_dump_json())
    assert [j.model for j in worker._take_batch()] == ["own-1", "own-2", "shared-1"]
    conn.rpush(worker.queue, job("own-3").model_dump_json())
    worker.stopping.set()
    worker.run()  # stops at once: what is left in its own list goes to the shared one
    assert [InferenceJob.model_validate_json(r).model for r in conn.lrange(QUEUE_KEY, 0, -1)] == [
        "shared-2",
        "own-3",
    ]
    assert not conn.exists(worker.queue)


# -- two real inference workers ------------------------------------------------------------------------


def tiny_family(root: Path) -> None:
    make_tiny_chat_llama(root / "base-a", seed=41, max_position_embeddings=2048)
    make_tiny_chat_llama(root / "base-b", seed=42)
    make_variant(root / "base-a", root / "tune-a", seed=43)
    for side in (root / "base-a").iterdir():  # the tokenizer's files
        if "token" in side.name:
            shutil.copy(side, root / "tune-a" / side.name)


@pytest.fixture
def two_workers(tmp_path, isolated_redis_url):
    root = tmp_path / "models"
    tiny_family(root)
    srv = start_server(tmp_path / "home", {"REDIS_URL": isolated_redis_url}, workers=0, infer_workers=2)
    try:
        with srv.client() as c:
            for model in ("base-a", "base-b"):
                r = c.post("/v1/models/import", json={"id": model, "path": str(root / model)})
                assert r.status_code == 201, r.text
            variant = {"id": "tune-a", "path": str(root / "tune-a"), "base": "base-a"}
            r = c.post("/v1/models/import", json=variant)
            assert r.status_code == 201, r.text
            record = r.json()["strata"]
            assert record["base_model"] == "base-a" and record["delta"] is not None
        yield srv, redis.Redis.from_url(isolated_redis_url)
    finally:
        stop_server(srv)


def generate(srv: Server, model: str, tokens: int = 12, stream: bool = False) -> str:
    body = {"model": model, "prompt": "the cat", "max_new_tokens": tokens, "temperature": 0, "stream": stream}
    with httpx.Client(base_url=srv.url, timeout=120) as c:
        r = c.post("/v1/generate", json=body)
    assert r.status_code == 200, r.text
    return r.text if stream else r.json()["text"]


def resident(srv: Server) -> dict[str, dict]:
    with srv.client() as c:
        return c.get("/health").json()["resident"]


def holder(srv: Server, base: str) -> str:
    holders = [worker for worker, bases in resident(srv).items() if base in bases]
    assert len(holders) == 1, resident(srv)
    return holders[0]


def test_each_base_stays_on_its_worker_and_nothing_is_loaded_twice(two_workers):
    srv, conn = two_workers
    models = ["base-a", "base-b", "tune-a"] * 6
    with ThreadPoolExecutor(4) as pool:
        texts = list(pool.map(lambda m: generate(srv, m), models))
    for model in set(models):  # greedy: the same text whichever batch a request was in
        assert len({t for m, t in zip(models, texts, strict=True) if m == model}) == 1
    time.sleep(2.5)  # a heartbeat: the report holds the variants too
    report = resident(srv)
    a, b = holder(srv, "base-a"), holder(srv, "base-b")
    assert a != b, report
    assert set(report[a]) == {"base-a"} and report[a]["base-a"]["variants"] == ["tune-a"], report
    assert set(report[b]) == {"base-b"}, report
    assert report[a]["base-a"]["loads"] == 1 and report[b]["base-b"]["loads"] == 1, report
    assert conn.get(capacity_key(a)) == conn.get(capacity_key(b)) == b"2"  # --max-models, for routing
    with srv.client() as c:
        assert c.get("/health").json()["capacity"] == {a: 2, b: 2}
    with srv.client() as c:  # the same in /metrics
        text = c.get("/metrics").text
    assert f'strata_base_loads{{base="base-a",worker="{a}"}} 1.0' in text
    assert f'strata_resident_bases{{worker="{b}"}} 1.0' in text
    routed = {
        line.split('how="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("strata_requests_routed_total{")
    }
    # one worker picked per base, every other request sent where its base is (or is being loaded)
    assert routed.get("new") == 2 and not routed.get("shared"), routed
    assert routed["new"] + routed.get("assigned", 0) + routed["affinity"] == len(models), routed


def pid_of(worker_id: str) -> int:
    return int(worker_id.split(":")[1])


def test_requests_queued_for_a_killed_worker_are_answered_by_another(two_workers):
    srv, _ = two_workers
    expected = {m: generate(srv, m) for m in ("base-a", "base-b", "tune-a")}
    a = holder(srv, "base-a")
    os.kill(pid_of(a), signal.SIGSTOP)  # frozen: requests for base-a are still routed (queued) to it
    try:
        with ThreadPoolExecutor(3) as pool:
            pending = [pool.submit(generate, srv, m) for m in ("base-a", "tune-a", "base-a")]
            time.sleep(1.5)
            assert not any(f.done() for f in pending)
            os.kill(pid_of(a), signal.SIGKILL)
            texts = [f.result(timeout=120) for f in pending]
    finally:
        try:
            os.kill(pid_of(a), signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert texts == [expected["base-a"], expected["tune-a"], expected["base-a"]]
    assert generate(srv, "base-b") == expected["base-b"]


def test_a_request_being_generated_when_its_worker_is_killed_is_answered_by_another(two_workers):
    srv, conn = two_workers
    expected = generate(srv, "base-a", tokens=1000)
    a = holder(srv, "base-a")
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(generate, srv, "base-a", 1000)
        for _ in range(2000):  # until the worker has started it (its `started` entry)
            started = [k for k in conn.scan_iter(f"{EVENTS_PREFIX}*") if conn.xlen(k) > 0]
            if started:
                break
            time.sleep(0.005)
        os.kill(pid_of(a), signal.SIGKILL)
        entries = [e[1][b"type"] for e in conn.xrange(started[0])] if conn.exists(started[0]) else []
        text = pending.result(timeout=120)
    assert b"started" in entries and b"finish" not in entries, entries  # killed mid-generation
    assert text == expected
