"""Failure recovery with real processes: a worker killed mid-job, and restarts of `strata serve` with its
embedded Redis (append-only file under STRATA_HOME)."""

from __future__ import annotations

import os
import signal
import time

import redis
from rq import Worker

from service.embedded_redis import EmbeddedRedis
from tests.conftest import start_server, stop_server
from tests.tiny_models import make_slow_llama


def test_killed_worker_fails_its_job_and_a_restart_cleans_up_and_keeps_the_registry(tmp_path):
    home = tmp_path / "home"
    big = tmp_path / "big"
    make_slow_llama(big)
    server = start_server(home, {"REDIS_URL": None}, infer_workers=0)  # embedded Redis
    try:
        with server.client() as c:
            assert c.post("/v1/models/import", json={"id": "big", "path": str(big)}).status_code == 201
            job_id = c.post(
                "/v1/jobs", json={"kind": "variants", "base": "big", "count": 16, "prefix": "v"}
            ).json()["id"]
            for _ in range(600):
                view = c.get(f"/v1/jobs/{job_id}").json()
                if view["status"] == "started" and view["progress"] > 0:
                    break
                time.sleep(0.05)
            assert view["status"] == "started"
            conn = redis.Redis.from_url(EmbeddedRedis(home).url)
            # the worker running the job (the background worker beside it takes only profiles)
            (worker,) = [w for w in Worker.all(connection=conn) if w.get_current_job_id() == job_id]
            os.kill(worker.pid, signal.SIGKILL)  # the work-horse dies with it
            for _ in range(100):
                view = c.get(f"/v1/jobs/{job_id}").json()
                if view["status"] != "started":
                    break
                time.sleep(0.1)
            assert view["status"] == "failed"
            assert "died while running the job" in view["error"]
            registered = {m["id"] for m in c.get("/v1/models").json()["data"]}
        staging = home / "models" / ".staging"
        half_written = [p.name for p in staging.iterdir()]
        assert len(half_written) <= 1  # the killed horse's (or none: its restarted worker cleaned up)
        assert not any(name.startswith(h.split(".")[0] + ".") for h in half_written for name in registered)
    finally:
        stop_server(server)

    server = start_server(home, {"REDIS_URL": None}, infer_workers=0)  # same home: same AOF, same store
    try:
        with server.client() as c:
            after = {m["id"] for m in c.get("/v1/models").json()["data"]}
            jobs = {j["id"]: j for j in c.get("/v1/jobs").json()["data"]}
        assert after == registered and "big" in after
        assert jobs[job_id]["status"] == "failed"
        assert not any(staging.iterdir())  # cleaned at the next start
        for model_id in after - {"big"}:  # every registered variant is complete
            assert (home / "models" / model_id / "model.safetensors").exists()
    finally:
        stop_server(server)
