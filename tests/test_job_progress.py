"""Job views tell the truth: ended jobs stop their clock, messages name the phase actually running."""

from __future__ import annotations

import time

from fastapi.testclient import TestClient

from service.app import create_app
from tests.tiny_models import make_slow_llama, make_tiny_chat_llama, make_tiny_llama, make_variant
from workers.settings import Settings


def test_a_job_canceled_while_queued_has_an_end_and_says_canceled(tmp_path, isolated_redis_url):
    make_tiny_llama(tmp_path / "base")
    make_variant(tmp_path / "base", tmp_path / "a", seed=1)
    settings = Settings(
        home=tmp_path / "home", redis_url=isolated_redis_url, default_model=False, import_roots=[tmp_path]
    )
    recipe = {"merge_method": "linear", "models": [{"model": str(tmp_path / p)} for p in ("base", "a")]}
    recipe["parameters"] = {"weight": 0.5}
    with TestClient(create_app(settings)) as c:  # no worker: the job stays queued
        job = c.post("/v1/merges", json=recipe).json()
        canceled = c.delete(f"/v1/jobs/{job['id']}").json()
        time.sleep(0.3)
        later = c.get(f"/v1/jobs/{job['id']}").json()
    assert canceled["status"] == "canceled" and canceled["message"] == "canceled"
    assert canceled["ended_at"] is not None and later["ended_at"] == canceled["ended_at"]


def test_a_running_job_that_is_canceled_stops_its_clock(server):
    path = server.home.parent / "slow-cancel"
    make_slow_llama(path)
    with server.client() as c:
        assert c.post("/v1/models/import", json={"id": "slow-cancel", "path": str(path)}).status_code == 201
        job = c.post("/v1/jobs", json={"kind": "variants", "base": "slow-cancel", "count": 8}).json()
        for _ in range(1200):
            if c.get(f"/v1/jobs/{job['id']}").json()["status"] == "started":
                break
            time.sleep(0.05)
        canceled = c.delete(f"/v1/jobs/{job['id']}").json()
        time.sleep(1.0)
        later = c.get(f"/v1/jobs/{job['id']}").json()
    assert canceled["status"] == "canceled" and later["ended_at"] is not None
    assert later["elapsed_s"] == canceled["elapsed_s"]


def test_a_finished_job_says_finished(server, tiny_family):
    with server.client() as c:
        recipe = {
            "merge_method": "linear",
            "models": [{"model": str(tiny_family[k]), "parameters": {"weight": 0.5}} for k in ("a", "b")],
        }
        final = server.wait_job(c.post("/v1/merges", json=recipe).json()["id"])
    assert final["status"] == "finished" and final["message"] == "finished"


def test_prune_progress_describes_the_healing_phase_while_it_runs(server):
    path = server.home.parent / "heal-me"
    make_tiny_chat_llama(path, seed=7)
    with server.client() as c:
        assert c.post("/v1/models/import", json={"id": "heal-me", "path": str(path)}).status_code == 201
        spec = {
            "kind": "prune",
            "model": "heal-me",
            "target": {"intermediate_size": 64},
            "compare_random": False,
            "heal": {"steps": 400},
            "seq_len": 32,
        }
        job = c.post("/v1/jobs", json=spec).json()
        views = []
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            view = c.get(f"/v1/jobs/{job['id']}").json()
            views.append(view)
            if view["status"] in ("finished", "failed", "canceled"):
                break
            time.sleep(0.05)
    assert views[-1]["status"] == "finished", views[-1]
    running = [(v["progress"], v["message"] or "") for v in views if v["status"] == "started"]
    healing = [p for p, message in running if message.startswith("healing:")]
    assert healing and all(0.5 <= p <= 0.9 for p in healing)
    assert all(p < 1.0 for p, _ in running)  # never "done" while work remains
    progress = [p for p, _ in running]
    assert progress == sorted(progress)
