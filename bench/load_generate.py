"""Load test: concurrent /v1/generate requests past the queue limit, loopback only, bounded count and time.

Starts its own `strata serve` (embedded Redis, one inference worker, a small STRATA_MAX_WAITING) on a tiny
random LLaMA unless --server is given, fires --requests concurrent requests in waves, and checks that every
request gets either a complete answer or a 429, that the server stays up, and that memory stays bounded.

    .venv/bin/python bench/load_generate.py                 # defaults: 400 requests, 64 at a time
    .venv/bin/python bench/load_generate.py --quick         # 40 requests
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.tiny_models import make_tiny_chat_llama  # noqa: E402


def tree_rss_mb(pid: int) -> float:
    proc = psutil.Process(pid)
    procs = [proc, *proc.children(recursive=True)]
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


def start(home: Path, port: int, max_waiting: int) -> subprocess.Popen:
    env = {
        **os.environ,
        "STRATA_HOME": str(home),
        "STRATA_DEFAULT_MODEL": "false",
        "STRATA_MAX_WAITING": str(max_waiting),
        "STRATA_IMPORT_ROOTS": str(home.parent),
    }
    env.pop("REDIS_URL", None)
    log = open(home.parent / "serve.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        try:
            h = httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).json()
            if h["inference_workers"] >= 1 and h["workers"] >= 1:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("server did not start")


async def one(client: httpx.AsyncClient, model: str, i: int) -> tuple[int, bool, float]:
    t0 = time.perf_counter()
    try:
        r = await client.post(
            "/v1/generate",
            json={
                "model": model,
                "prompt": f"request {i} says",
                "max_new_tokens": 16,
                "temperature": 0.7,
                "seed": i,
            },
        )
    except httpx.HTTPError:
        return -1, False, time.perf_counter() - t0
    complete = r.status_code == 200 and r.json().get("finish_reason") in ("stop", "length")
    return r.status_code, complete, time.perf_counter() - t0


async def run(url: str, model: str, total: int, concurrency: int, deadline_s: float) -> list:
    results = []
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        stop_at = time.monotonic() + deadline_s
        for start_i in range(0, total, concurrency):
            if time.monotonic() > stop_at:
                break
            wave = [one(client, model, i) for i in range(start_i, min(total, start_i + concurrency))]
            results += await asyncio.gather(*wave)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--max-waiting", type=int, default=16)
    parser.add_argument("--deadline-s", type=float, default=300)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.concurrency = 40, 20

    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        home.mkdir()
        make_tiny_chat_llama(Path(tmp) / "tiny", seed=1)
        port = 18000 + os.getpid() % 1000
        url = f"http://127.0.0.1:{port}"
        proc = start(home, port, args.max_waiting)
        try:
            httpx.post(
                f"{url}/v1/models/import", json={"id": "tiny", "path": f"{tmp}/tiny"}
            ).raise_for_status()
            asyncio.run(run(url, "tiny", 8, 8, 60))  # warm-up: load the model in the worker
            rss_before = tree_rss_mb(proc.pid)
            t0 = time.perf_counter()
            results = asyncio.run(run(url, "tiny", args.requests, args.concurrency, args.deadline_s))
            wall = time.perf_counter() - t0
            rss_after = tree_rss_mb(proc.pid)
            up = httpx.get(f"{url}/health", timeout=5).json()["status"] == "ok"
        finally:
            proc.terminate()
            proc.wait(timeout=30)

    ok = [r for r in results if r[0] == 200]
    complete = sum(1 for r in ok if r[1])
    rejected = sum(1 for r in results if r[0] == 429)
    other = len(results) - len(ok) - rejected
    latencies = sorted(r[2] for r in ok) or [0.0]
    print(
        f"{'requests':>10} {'200':>6} {'complete':>9} {'429':>6} {'other':>6} {'p50 s':>7} {'p95 s':>7} "
        f"{'req/s':>7} {'RSS before MB':>14} {'RSS after MB':>13}"
    )
    p95 = latencies[int(0.95 * (len(latencies) - 1))]
    print(
        f"{len(results):>10} {len(ok):>6} {complete:>9} {rejected:>6} {other:>6} "
        f"{statistics.median(latencies):>7.2f} {p95:>7.2f} {len(ok) / wall:>7.1f} "
        f"{rss_before:>14.0f} {rss_after:>13.0f}"
    )
    print(
        f"load: requests={len(results)} ok={len(ok)} complete={complete} rejected_429={rejected} "
        f"other={other} server_up={str(up).lower()} rss_growth_mb={rss_after - rss_before:.0f}"
    )


if __name__ == "__main__":
    main()
