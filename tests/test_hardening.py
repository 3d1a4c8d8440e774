"""Access and input safety of the API: keys, body size, disk, per-kind job limits, Redis outages."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.embedded_redis import EmbeddedRedis
from tests.tiny_models import make_tiny_llama, make_variant
from workers.settings import Settings


def client(tmp_path, redis_url: str, **settings) -> TestClient:
    values = dict(home=tmp_path / "home", redis_url=redis_url, default_model=False, import_roots=[tmp_path])
    return TestClient(create_app(Settings(**{**values, **settings})))


@pytest.fixture
def family(tmp_path):
    make_tiny_llama(tmp_path / "base", seed=0)
    make_variant(tmp_path / "base", tmp_path / "a", seed=1)
    return tmp_path


def merge_yaml(root) -> str:
    return (
        f"merge_method: task_arithmetic\nbase_model: {root / 'base'}\n"
        f"models:\n  - model: {root / 'a'}\n    parameters: {{weight: 0.5}}\n"
    )


def test_api_keys_guard_every_endpoint_but_health(tmp_path, isolated_redis_url):
    keys_file = tmp_path / "keys"
    keys_file.write_text("# ops\nsecret-one\nsecret-two\n")
    for keys in ("secret-one, secret-two", str(keys_file)):
        with client(tmp_path, isolated_redis_url, api_keys=keys) as c:
            assert c.get("/health").status_code == 200
            missing = c.get("/v1/models")
            assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
            assert "API key" in missing.json()["detail"]
            assert c.get("/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
            assert c.get("/v1/models", headers={"Authorization": "Basic secret-one"}).status_code == 401
            assert c.get("/v1/models", headers={"Authorization": "Bearer secret-two"}).status_code == 200
            assert c.get("/openapi.json").status_code == 401


def test_oversized_bodies_get_413(tmp_path, isolated_redis_url):
    with client(tmp_path, isolated_redis_url, max_body_bytes=64) as c:
        r = c.post(
            "/v1/merges", content="merge_method: linear\n" * 10, headers={"Content-Type": "application/yaml"}
        )
        assert r.status_code == 413 and "STRATA_MAX_BODY_BYTES" in r.json()["detail"]

        def chunks():  # no Content-Length: counted as it streams
            for _ in range(10):
                yield b"merge_method: linear\n"

        r = c.post("/v1/merges", content=chunks(), headers={"Content-Type": "application/yaml"})
        assert r.status_code == 413


def test_a_merge_that_would_fill_the_disk_is_refused_before_it_starts(tmp_path, isolated_redis_url, family):
    with client(tmp_path, isolated_redis_url, min_free_bytes=10**18) as c:
        r = c.post("/v1/merges", content=merge_yaml(family), headers={"Content-Type": "application/yaml"})
    assert r.status_code == 507 and "not enough disk" in r.json()["detail"]


def test_jobs_per_kind_are_bounded_with_429(tmp_path, isolated_redis_url, family):
    with client(tmp_path, isolated_redis_url, max_active_jobs_per_kind=1) as c:
        first = c.post("/v1/merges", content=merge_yaml(family), headers={"Content-Type": "application/yaml"})
        second = c.post(
            "/v1/merges", content=merge_yaml(family), headers={"Content-Type": "application/yaml"}
        )
        assert first.status_code == 202  # no worker listens: it stays queued
        assert second.status_code == 429 and second.headers["retry-after"]
        assert c.delete(f"/v1/jobs/{first.json()['id']}").json()["status"] == "canceled"
        third = c.post("/v1/merges", content=merge_yaml(family), headers={"Content-Type": "application/yaml"})
        assert third.status_code == 202


def test_redis_outage_gives_fast_503_and_recovers_by_itself(tmp_path):
    redis_server = EmbeddedRedis(tmp_path / "r")
    url = redis_server.start()
    try:
        with client(tmp_path, url) as c:
            assert c.get("/v1/models").status_code == 200
            redis_server.stop()
            start = time.monotonic()
            down = c.get("/v1/models")
            assert down.status_code == 503 and "Redis is unavailable" in down.json()["detail"]
            assert time.monotonic() - start < 5
            assert c.get("/health").json() == {
                "status": "degraded",
                "redis": False,
                "workers": 0,
                "inference_workers": 0,
                "resident": {},
                "capacity": {},
            }
            redis_server.start()
            assert c.get("/v1/models").status_code == 200
    finally:
        redis_server.stop()
