"""Shared fixtures: a real Redis, and a real `strata serve` (API + worker) on it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import redis

from service.embedded_redis import EmbeddedRedis

os.environ.setdefault("HF_HUB_OFFLINE", "1")
MACHINE_REDIS = "redis://127.0.0.1:6379"


def _claim_machine_db() -> int | None:
    """A database of the machine's Redis that no other test session uses (a lock in db 0), or None
    when there is no Redis at 127.0.0.1:6379."""
    try:
        lock = redis.Redis.from_url(f"{MACHINE_REDIS}/0", socket_connect_timeout=0.5)
        lock.ping()
    except (redis.ConnectionError, redis.TimeoutError):
        return None
    for db in range(1, 16):
        if lock.set(f"strata-tests:db:{db}", os.getpid(), nx=True, ex=4 * 3600):
            return db
    return None


def _release_machine_db(db: int) -> None:
    redis.Redis.from_url(f"{MACHINE_REDIS}/0").delete(f"strata-tests:db:{db}")


def _real_redis(home: Path):
    """Yield the URL of a real, empty Redis: a database of the machine's own, else an embedded server."""
    db = _claim_machine_db()
    embedded = None
    if db is None:
        embedded = EmbeddedRedis(home)
        url = embedded.start()
    else:
        url = f"{MACHINE_REDIS}/{db}"
    redis.Redis.from_url(url).flushdb()
    try:
        yield url
    finally:
        if embedded:
            embedded.stop()
        else:
            redis.Redis.from_url(url).flushdb()
            _release_machine_db(db)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory) -> str:
    """The Redis the session's `strata serve` uses."""
    yield from _real_redis(tmp_path_factory.mktemp("redis-home"))


@pytest.fixture
def isolated_redis_url(tmp_path) -> str:
    """A Redis no worker listens on."""
    yield from _real_redis(tmp_path / "isolated-redis")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, url: str, home: Path, process: subprocess.Popen, log: Path):
        self.url, self.home, self.process, self.log = url, home, process, log

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60)

    def wait_job(self, job_id: str, timeout: float = 600) -> dict:
        deadline = time.monotonic() + timeout
        with self.client() as c:
            while time.monotonic() < deadline:
                view = c.get(f"/v1/jobs/{job_id}").json()
                if view["status"] in ("finished", "failed", "canceled"):
                    return view
                time.sleep(0.2)
        raise AssertionError(f"job {job_id} did not end in {timeout} s; log: {self.log.read_text()[-3000:]}")

    def run_job(self, body: dict, timeout: float = 600) -> dict:
        """Submit a job (202 expected), wait for it, and return its result; it must finish."""
        with self.client() as c:
            r = c.post("/v1/jobs", json=body)
            assert r.status_code == 202, r.text
        final = self.wait_job(r.json()["id"], timeout=timeout)
        assert final["status"] == "finished", final["error"]
        return final["result"]

    def start_slow_job(self, model_dir: Path, prefix: str) -> str:
        """Import a slow-to-copy model from `model_dir` and start a `variants` job of 16 on it; its id once
        a worker runs it."""
        from tests.tiny_models import make_slow_llama

        make_slow_llama(model_dir)
        with self.client() as c:
            r = c.post("/v1/models/import", json={"id": model_dir.name, "path": str(model_dir)})
            assert r.status_code == 201, r.text
            r = c.post(
                "/v1/jobs", json={"kind": "variants", "base": model_dir.name, "count": 16, "prefix": prefix}
            )
            job_id = r.json()["id"]
            for _ in range(600):
                if c.get(f"/v1/jobs/{job_id}").json()["status"] == "started":
                    return job_id
                time.sleep(0.05)
        raise AssertionError(f"job {job_id} did not start; log: {self.log.read_text()[-3000:]}")


def start_server(
    home: Path,
    env_extra: dict[str, str | None],
    workers: int = 1,
    infer_workers: int = 1,
    new_session: bool = False,  # its own process group, as `make serve` in a terminal
) -> Server:
    port = free_port()
    env = {
        **os.environ,
        "STRATA_HOME": str(home),
        "STRATA_IMPORT_ROOTS": str(home.parent),
        "STRATA_DEFAULT_MODEL": "false",
        "STRATA_INFER_PRECISION": "float32",  # exactness tests compare with float32 references
        "STRATA_PROFILE_ON_REGISTER": "false",  # tests that want background profiles turn it on
        **env_extra,
    }
    env = {k: v for k, v in env.items() if v is not None}  # None unsets (REDIS_URL: None = embedded Redis)
    log = home.parent / f"serve-{port}.log"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "service.cli",
            "serve",
            "--port",
            str(port),
            "--workers",
            str(workers),
            "--infer-workers",
            str(infer_workers),
        ],
        env=env,
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
        start_new_session=new_session,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240  # workers import torch; slow on a busy 2-core machine
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"strata serve exited: {log.read_text()[-3000:]}")
        try:
            health = httpx.get(f"{url}/health", timeout=1).json()
            if health["workers"] >= workers and health["inference_workers"] >= infer_workers:
                return Server(url, home, process, log)
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"strata serve did not become healthy: {log.read_text()[-3000:]}")


def stop_server(server: Server) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.process.kill()


@pytest.fixture(scope="session")
def server(tmp_path_factory, redis_url) -> Server:
    """`strata serve` with one worker on the test Redis; import roots = the session's temp dir."""
    root = tmp_path_factory.mktemp("strata")
    srv = start_server(root / "home", {"REDIS_URL": redis_url})
    yield srv
    stop_server(srv)


@pytest.fixture(scope="session")
def tiny_family(server) -> dict[str, Path]:
    """Three homologous tiny LLaMA models (base + two variants) in the import root."""
    from tests.tiny_models import make_tiny_llama, make_variant

    root = server.home.parent / "family"
    make_tiny_llama(root / "base", seed=0)
    make_variant(root / "base", root / "a", seed=1, scale=0.01)
    make_variant(root / "base", root / "b", seed=2, scale=0.02)
    return {"base": root / "base", "a": root / "a", "b": root / "b"}
