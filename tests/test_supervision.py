"""`strata serve` keeps its processes alive, /health tells the truth, and generation requests whose worker
dies, stalls or whose client leaves end promptly (real processes, real Redis)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import psutil
import pytest
import redis

from service.supervisor import HUNG_AFTER_S, Supervisor
from tests.conftest import _real_redis as real_redis
from tests.conftest import start_server, stop_server
from tests.tiny_models import character_tokenizer, make_tiny_chat_llama, make_tiny_llama
from workers.generation.engine import EarlyExitEngine, FinishEvent, GenerationRequest, TokenEvent
from workers.inference.protocol import cancel_key, events_key

RESTART_S = 10
JOB_WORKER = "service.cli worker --queue user"


def children(server, name: str) -> list[psutil.Process]:
    """Live processes `strata serve` started whose command line contains `name`."""
    found = []
    for child in psutil.Process(server.process.pid).children(recursive=False):
        try:
            if child.status() != psutil.STATUS_ZOMBIE and name in " ".join(child.cmdline()):
                found.append(child)
        except psutil.NoSuchProcess:
            pass
    return found


def wait_for(condition, timeout: float, step: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(step)
    return None


def make_endless_model(path) -> None:
    """A chat model that never emits EOS (none configured), slow enough that 1000 tokens take seconds."""
    make_tiny_llama(
        path,
        seed=4,
        eos_token_id=None,
        hidden_size=512,  # the engine decodes the 8-layer, 256-wide model's 1000 tokens in under 2 s now
        intermediate_size=1024,
        num_hidden_layers=12,
        max_position_embeddings=2048,
    )
    tokenizer = character_tokenizer()
    tokenizer.eos_token = None
    tokenizer.save_pretrained(path)


@pytest.fixture(scope="module")
def own_redis_url(tmp_path_factory):
    """A Redis database of this module's own: no other server's workers may take its requests."""
    yield from real_redis(tmp_path_factory.mktemp("supervised-redis"))


@pytest.fixture(scope="module")
def supervised(tmp_path_factory, own_redis_url):
    root = tmp_path_factory.mktemp("supervised")
    server = start_server(root / "home", {"REDIS_URL": own_redis_url})
    server.redis_url = own_redis_url
    make_endless_model(root / "endless")
    with server.client() as c:
        r = c.post("/v1/models/import", json={"id": "endless", "path": str(root / "endless")})
        assert r.status_code == 201, r.text
    yield server
    stop_server(server)


def test_a_killed_job_worker_is_restarted_and_health_reports_it(supervised):
    (old,) = children(supervised, JOB_WORKER)
    os.kill(old.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    with supervised.client() as c:
        degraded = wait_for(lambda: (r := c.get("/health")).status_code == 503 and r.json(), 5, 0.05)
        assert degraded and degraded["workers"] == 0 and degraded["status"] == "degraded"
        new = wait_for(lambda: children(supervised, JOB_WORKER), RESTART_S)
        assert new and new[0].pid != old.pid
        assert time.monotonic() - killed_at < RESTART_S
        healthy = wait_for(lambda: (r := c.get("/health")).status_code == 200 and r.json(), 120, 0.5)
        assert healthy and len(healthy.pop("resident")) == 1  # what the one inference worker holds
        assert list(healthy.pop("capacity").values()) == [2]  # and how many bases it keeps
        assert healthy == {"status": "ok", "redis": True, "workers": 1, "inference_workers": 1}


def _stream_until_first_token(client: httpx.Client, body: dict):
    stream = client.stream("POST", "/v1/generate", json={**body, "stream": True})
    response = stream.__enter__()
    lines = response.iter_lines()
    for line in lines:
        if line.startswith("data: {") and json.loads(line[6:]).get("type") == "token":
            return stream, lines
    raise AssertionError("no token streamed")


ENDLESS = {"model": "endless", "prompt": "once upon a time", "max_new_tokens": 1000}


def test_a_streamed_generation_whose_worker_dies_gets_a_prompt_503_an_unstreamed_one_is_sent_again(
    supervised,
):
    with supervised.client() as c:
        stream, lines = _stream_until_first_token(c, ENDLESS)
        (worker,) = children(supervised, "service.cli infer")
        os.kill(worker.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
        stream.__exit__(None, None, None)
        assert time.monotonic() - killed_at < 5
        assert events[-1]["type"] == "error" and "died" in events[-1]["error"]
        assert wait_for(lambda: children(supervised, "service.cli infer"), RESTART_S)
        assert wait_for(lambda: c.get("/health").status_code == 200, 180, 0.5)  # it has registered

        # not streamed: its client has seen nothing yet, so it is sent again (service.generation.routing) and
        # answered by the restarted worker
        outcome = {}

        def ask() -> None:
            outcome["response"] = c.post("/v1/generate", json=ENDLESS, timeout=300)

        asker = threading.Thread(target=ask)
        asker.start()
        conn = redis.Redis.from_url(supervised.redis_url)
        assert wait_for(lambda: conn.keys(events_key("*")), 180, 0.05), "generation never started"
        (worker,) = children(supervised, "service.cli infer")
        os.kill(worker.pid, signal.SIGKILL)
        asker.join(300)
        response = outcome["response"]
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] > 0


def test_an_abandoned_stream_is_cancelled_in_the_worker(supervised):
    conn = redis.Redis.from_url(supervised.redis_url)
    assert wait_for(lambda: httpx.get(f"{supervised.url}/health").status_code == 200, 180, 0.5)
    with supervised.client() as c:
        stream, _ = _stream_until_first_token(c, ENDLESS)
        (key,) = conn.keys(events_key("*"))
        request_id = key.decode().removeprefix(events_key(""))
        stream.__exit__(None, None, None)  # the client goes away
    assert wait_for(lambda: conn.exists(cancel_key(request_id)), 10)
    assert wait_for(lambda: not conn.exists(events_key(request_id)), 10)  # the API let go of it
    time.sleep(2)  # a worker still generating would append to the events stream again
    assert not conn.exists(events_key(request_id))


def test_a_request_whose_client_gives_up_is_cancelled_in_the_worker(supervised):
    conn = redis.Redis.from_url(supervised.redis_url)
    assert wait_for(lambda: httpx.get(f"{supervised.url}/health").status_code == 200, 180, 0.5)
    outcome = {}

    def ask() -> None:
        with httpx.Client(base_url=supervised.url, timeout=httpx.Timeout(300, read=2)) as c:
            try:
                outcome["response"] = c.post("/v1/generate", json=ENDLESS)  # not streamed
            except httpx.ReadTimeout:
                outcome["gave_up"] = time.monotonic()

    asker = threading.Thread(target=ask)
    asker.start()
    keys = wait_for(lambda: conn.keys(events_key("*")), 60, 0.02)
    assert keys, "generation never started"
    request_id = keys[0].decode().removeprefix(events_key(""))
    asker.join(60)
    assert "gave_up" in outcome, outcome  # still generating when the client left
    assert wait_for(lambda: conn.exists(cancel_key(request_id)), 10)
    assert wait_for(lambda: not conn.exists(events_key(request_id)), 10)
    time.sleep(2)  # a worker still generating would append to the events stream again
    assert not conn.exists(events_key(request_id))


def replaced(server, name: str, old: psutil.Process, timeout: float) -> psutil.Process | None:
    """The child that took `old`'s place, once `old` is gone."""

    def new() -> psutil.Process | None:
        if psutil.pid_exists(old.pid) and old.status() != psutil.STATUS_ZOMBIE:
            return None
        fresh = [p for p in children(server, name) if p.pid != old.pid]
        return fresh[0] if fresh else None

    return wait_for(new, timeout, 0.2)


def test_a_hung_job_worker_is_replaced_its_job_failed_and_queued_jobs_run(supervised):
    slow = supervised.start_slow_job(supervised.home.parent / "slow", prefix="hung")
    (old,) = children(supervised, JOB_WORKER)
    frozen = [old, *old.children(recursive=True)]  # the worker and the work-horse running the slow job
    for process in frozen:
        process.send_signal(signal.SIGSTOP)  # alive, but neither beating, working nor taking jobs
    try:
        with supervised.client() as c:
            queued = c.post("/v1/jobs", json={"kind": "truncate", "model": "endless", "num_layers": 2})
            assert queued.status_code == 202, queued.text
            new = replaced(supervised, JOB_WORKER, old, HUNG_AFTER_S + 30)
            assert new is not None, supervised.log.read_text()[-3000:]
            failed = supervised.wait_job(slow, timeout=30)
            assert failed["status"] == "failed" and "stopped responding" in failed["error"], failed
            assert "\n" not in failed["error"]
            done = supervised.wait_job(queued.json()["id"], timeout=240)
            assert done["status"] == "finished", done
    finally:
        for process in frozen:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.send_signal(signal.SIGCONT)


def test_a_hung_inference_worker_is_replaced_and_requests_are_served_again(supervised):
    with supervised.client() as c:
        assert wait_for(lambda: c.get("/health").status_code == 200, 180, 0.5)
        (old,) = children(supervised, "service.cli infer")
        os.kill(old.pid, signal.SIGSTOP)
        try:
            new = replaced(supervised, "service.cli infer", old, HUNG_AFTER_S + 30)
            assert new is not None, supervised.log.read_text()[-3000:]
            assert wait_for(lambda: c.get("/health").status_code == 200, 180, 0.5)
            r = c.post("/v1/generate", json={**ENDLESS, "max_new_tokens": 4}, timeout=180)
            assert r.status_code == 200, r.text
        finally:
            if psutil.pid_exists(old.pid):
                os.kill(old.pid, signal.SIGCONT)


def test_a_generation_whose_worker_stalls_gets_a_504_and_is_cancelled(tmp_path, isolated_redis_url):
    redis_url = isolated_redis_url
    server = start_server(
        tmp_path / "home", {"REDIS_URL": redis_url, "STRATA_GENERATION_STALL_S": "4"}, workers=0
    )
    try:
        make_endless_model(tmp_path / "endless")
        with server.client() as c:
            r = c.post("/v1/models/import", json={"id": "endless", "path": str(tmp_path / "endless")})
            assert r.status_code == 201, r.text
            warm = c.post("/v1/generate", json={**ENDLESS, "max_new_tokens": 2})  # the model is loaded
            assert warm.status_code == 200, warm.text
            outcome = {}

            def ask() -> None:
                outcome["response"] = c.post("/v1/generate", json=ENDLESS, timeout=300)

            asker = threading.Thread(target=ask)
            asker.start()
            conn = redis.Redis.from_url(redis_url)
            keys = wait_for(lambda: conn.keys(events_key("*")), 60, 0.02)
            assert keys, "generation never started"
            assert wait_for(lambda: conn.xlen(keys[0]) >= 3, 60, 0.02)  # started, then tokens
            (worker,) = children(server, "service.cli infer")
            os.kill(worker.pid, signal.SIGSTOP)  # alive, heartbeat and all, but producing nothing
            stopped_at = time.monotonic()
            try:
                asker.join(60)
                waited = time.monotonic() - stopped_at
            finally:
                os.kill(worker.pid, signal.SIGCONT)
        response = outcome["response"]
        assert response.status_code == 504 and "STRATA_GENERATION_STALL_S" in response.json()["detail"]
        assert 3 < waited < 15
        (key,) = conn.keys(cancel_key("*"))  # and the worker was told to drop it
    finally:
        stop_server(server)


def test_engine_drops_a_cancelled_request_between_steps_and_the_others_continue(tmp_path):
    model = make_tiny_chat_llama(tmp_path / "m", seed=2)
    engine = EarlyExitEngine(model, character_tokenizer(), device="cpu")
    keep = GenerationRequest(prompt_ids=[5, 6, 7], depth=4, max_new_tokens=12, ignore_eos=True)
    gone = GenerationRequest(prompt_ids=[8, 9], depth=4, max_new_tokens=12, ignore_eos=True)
    seen: dict[str, int] = {keep.request_id: 0, gone.request_id: 0}
    cancelled: set[str] = set()
    finished = {}
    for event in engine.generate([keep, gone], lambda: cancelled):
        if isinstance(event, TokenEvent):
            seen[event.request_id] += 1
            if seen[gone.request_id] == 3:
                cancelled.add(gone.request_id)
        elif isinstance(event, FinishEvent):
            finished[event.request_id] = event
    assert seen[gone.request_id] == 3 and gone.request_id not in finished
    alone = list(engine.generate([keep]))
    assert finished[keep.request_id].token_ids == alone[-1].token_ids  # unaffected by the drop


def test_a_killed_embedded_redis_is_restarted_with_its_data(tmp_path):
    server = start_server(tmp_path / "home", {"REDIS_URL": None}, workers=1, infer_workers=0)
    try:
        make_tiny_llama(tmp_path / "keep")
        with server.client() as c:
            assert (
                c.post("/v1/models/import", json={"id": "keep", "path": str(tmp_path / "keep")}).status_code
                == 201
            )
            time.sleep(1.5)  # appendfsync everysec
            (old,) = children(server, "redis-server")
            os.kill(old.pid, signal.SIGKILL)
            killed_at = time.monotonic()
            assert wait_for(lambda: c.get("/v1/models").status_code == 200, RESTART_S, 0.2)
            assert time.monotonic() - killed_at < RESTART_S
            assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["keep"]
            assert wait_for(lambda: c.get("/health").status_code == 200, 120, 0.5)
    finally:
        stop_server(server)


def test_a_halted_supervisor_restarts_nothing_that_exits(monkeypatch):
    # Ctrl-C reaches Redis and the workers with `strata serve`: during a stop, exits are not failures
    def exited_children(halt: bool) -> list[str]:
        spawned: list[str] = []
        supervisor = Supervisor(["worker", "infer"], env={})
        monkeypatch.setattr(supervisor, "_spawn", lambda child: spawned.append(child.command))
        for child in supervisor.children:
            child.process = subprocess.Popen([sys.executable, "-c", "pass"])
            child.process.wait()
        if halt:
            supervisor.halt()
        supervisor.check()
        assert supervisor.restarts == len(spawned)
        return spawned

    assert exited_children(halt=True) == []
    assert exited_children(halt=False) == ["worker", "infer"]  # the same exits while serving: restarted
