"""CPU-bound request work (YAML parsing, tokenizing) runs off the event loop, and job waits are served by
the API (?wait=S) instead of client polling loops (real `strata serve`, real Redis)."""

from __future__ import annotations

import threading
import time

import httpx
from fastapi.testclient import TestClient

from service.app import create_app
from tests.tiny_models import make_tiny_chat_llama
from workers.settings import Settings


def health_latencies_during(server, send) -> tuple[list[float], float]:
    """Run `send(client)` in a thread and time /health meanwhile; (health latencies, send duration)."""
    done = threading.Event()
    took = {}

    def run() -> None:
        start = time.monotonic()
        with httpx.Client(base_url=server.url, timeout=300) as c:
            took["response"] = send(c)
        took["s"] = time.monotonic() - start
        done.set()

    thread = threading.Thread(target=run)
    thread.start()
    latencies = []
    with httpx.Client(base_url=server.url, timeout=300) as c:
        time.sleep(0.2)  # let the request arrive
        while not done.is_set():
            start = time.monotonic()
            c.get("/health")
            latencies.append(time.monotonic() - start)
            time.sleep(0.05)
    thread.join()
    return latencies, took["s"]


def test_health_answers_while_a_large_yaml_recipe_is_parsed(server):
    entries = "".join("  - model: no-such-model\n    parameters: {weight: 0.5}\n" for _ in range(18_000))
    recipe = f"merge_method: linear\nmodels:\n{entries}"

    def send(c: httpx.Client) -> httpx.Response:
        return c.post("/v1/merges", content=recipe, headers={"Content-Type": "application/yaml"})

    latencies, took = health_latencies_during(server, send)
    assert len(latencies) >= 3, took
    # On the event loop, /health would wait for the whole parse; off it, it answers between GIL slices.
    assert max(latencies) < took / 4, (max(latencies), took)


def test_health_answers_while_a_long_prompt_is_tokenized(server):
    path = server.home.parent / "tokenize-me"
    make_tiny_chat_llama(path, seed=9)
    with server.client() as c:
        assert c.post("/v1/models/import", json={"id": "tokenize-me", "path": str(path)}).status_code == 201

    def send(c: httpx.Client) -> httpx.Response:
        return c.post("/v1/generate", json={"model": "tokenize-me", "prompt": "the cat sat. " * 80_000})

    latencies, took = health_latencies_during(server, send)
    assert len(latencies) >= 3, took
    assert max(latencies) < took / 4, (max(latencies), took)


def test_job_wait_answers_when_the_job_ends_or_the_wait_is_over(
    server, tiny_family, tmp_path, isolated_redis_url
):
    recipe = {
        "merge_method": "linear",
        "models": [{"model": str(tiny_family[k]), "parameters": {"weight": 0.5}} for k in ("a", "b")],
    }
    with server.client() as c:
        job = c.post("/v1/merges", json=recipe).json()
        view = c.get(f"/v1/jobs/{job['id']}", params={"wait": 300}).json()
        assert view["status"] == "finished"  # one call, no polling loop
        assert c.get(f"/v1/jobs/{job['id']}", params={"wait": 601}).status_code == 422
    settings = Settings(
        home=tmp_path / "home",
        redis_url=isolated_redis_url,
        default_model=False,
        import_roots=[tiny_family["a"].parent],
    )
    with TestClient(create_app(settings)) as c:  # no worker: the job stays queued
        job = c.post("/v1/merges", json=recipe).json()
        start = time.monotonic()
        view = c.get(f"/v1/jobs/{job['id']}", params={"wait": 1}).json()
        assert view["status"] == "queued" and time.monotonic() - start >= 1
