"""Several inference workers serving several bases: routed by base against one shared list (before issue 26).

    .venv/bin/python bench/routing_by_base.py [--work-dir DIR] [--default-model] [--requests 24]

Real `strata infer` processes (`--workers`, each `--max-models 1` by default, so a base a worker is not
holding is a load) on a real Redis (an embedded one); requests round-robin over `--bases` bases (copies of
one model under different ids: the default model with `--default-model`, else a tiny random one),
`--concurrency` at a time (each client sends its next request when its last is answered), full depth,
`--new-tokens` each (EOS ignored). Per mode, fresh workers:

- shared: every request pushed to the shared list, which any worker takes from (the behaviour before
  routing);
- routed: every request routed by its base (service.generation.routing: affinity, claims, empty worker).

Modes alternate (shared, routed, shared, ...) with `--repeats`, so a busy machine slows them alike; read
the ratios. Reported per mode: tokens/s, p50/p99 latency, and the loads (each worker's "loading" log
lines: a base loaded more than once per worker is thrash).

Summary: routing_by_base: routed_vs_shared_throughput=<x> p99_routed_vs_shared=<x> loads_shared=<n>
loads_routed=<n>
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from redis import Redis  # noqa: E402

from bench.random_llama import TINY, write_character_tokenizer, write_random_llama  # noqa: E402
from service.embedded_redis import EmbeddedRedis  # noqa: E402
from service.fleet import live_inference_workers, resident_models  # noqa: E402
from service.generation.routing import enqueue, read_fleet  # noqa: E402
from workers.default_model import convert_default_model  # noqa: E402
from workers.generation.engine import GenerationRequest  # noqa: E402
from workers.inference.protocol import QUEUE_KEY, InferenceJob, events_key  # noqa: E402
from workers.store.model_files import read_config  # noqa: E402

PROMPT_IDS = [1, 415, 2565, 282, 3649, 314]  # token ids below every vocabulary used here


def make_bases(models_dir: Path, count: int, default_model: bool, cache: Path) -> int:
    """`count` copies of one model under ids base-0.. in `models_dir`; its number of layers."""
    source = cache / ("default" if default_model else "tiny")
    if not (source / "config.json").is_file():
        if default_model:
            convert_default_model(source)
        else:
            write_random_llama(source, TINY, seed=0)
            write_character_tokenizer(source)
    for i in range(count):
        target = models_dir / f"base-{i}"
        if not target.exists():
            shutil.copytree(source, target)
    return int(read_config(source)["num_hidden_layers"])


def start_workers(n: int, env: dict[str, str], max_models: int, logs: Path) -> list[subprocess.Popen]:
    command = [sys.executable, "-m", "service.cli", "infer", "--max-models", str(max_models)]
    return [
        subprocess.Popen(
            command, env=env, stdout=open(logs / f"worker-{i}.log", "w"), stderr=subprocess.STDOUT
        )
        for i in range(n)
    ]


def stop_workers(workers: list[subprocess.Popen]) -> None:
    for worker in workers:
        worker.terminate()
    for worker in workers:
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()


def wait_ready(redis: Redis, n: int, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if len(resident_models(redis)) >= n:
            return
        time.sleep(0.2)
    raise RuntimeError(f"{n} inference workers did not report in {timeout_s} s")


def one_request(redis: Redis, mode: str, base: str, depth: int, new_tokens: int) -> float:
    """Send one request (shared list or routed) and wait for its finish; its latency in seconds."""
    request = GenerationRequest(
        prompt_ids=PROMPT_IDS, depth=depth, max_new_tokens=new_tokens, ignore_eos=True
    )
    job = InferenceJob(model=base, request=request, stream=False)
    started = time.monotonic()
    if mode == "shared":
        redis.rpush(QUEUE_KEY, job.model_dump_json())
    else:
        enqueue(redis, read_fleet(redis, live_inference_workers(redis)), base, job.model_dump_json())
    key, last = events_key(request.request_id), "0-0"
    while True:
        reply = redis.xread({key: last}, count=64, block=1000)  # within the client's socket timeout
        if not reply:
            if time.monotonic() - started > 300:
                raise RuntimeError(f"request for {base} not answered in 300 s")
            continue
        for entry_id, fields in reply[0][1]:
            last = entry_id
            kind = fields[b"type"].decode()
            if kind == "error":
                raise RuntimeError(json.loads(fields[b"data"])["error"])
            if kind == "finish":
                redis.delete(key)
                return time.monotonic() - started


def run_mode(redis: Redis, mode: str, args, depth: int) -> dict:
    latencies: list[float] = []
    lock = threading.Lock()
    counter = iter(range(args.requests))

    errors: list[BaseException] = []

    def client() -> None:
        try:
            for i in counter:  # shared iterator: the next request number, round-robin over the bases
                latency = one_request(redis, mode, f"base-{i % args.bases}", depth, args.new_tokens)
                with lock:
                    latencies.append(latency)
        except BaseException as e:  # noqa: BLE001 - re-raised by run_mode
            errors.append(e)

    threads = [threading.Thread(target=client) for _ in range(args.concurrency)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.monotonic() - started
    if errors:
        raise errors[0]
    latencies.sort()
    return {
        "tok_s": args.requests * args.new_tokens / wall,
        "p50": statistics.median(latencies),
        "p99": latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))],
    }


def loads(logs: Path) -> int:
    return sum(
        line.count(" loading ")
        for path in logs.glob("worker-*.log")
        for line in path.read_text().splitlines()
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work-dir", type=Path, default=None)
    parser.add_argument(
        "--default-model", action="store_true", help="SmolLM2-135M-Instruct, not a tiny model"
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--bases", type=int, default=2)
    parser.add_argument("--max-models", type=int, default=1)
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="routing-bench-"))
    home = work / "home"
    models = home / "models"
    models.mkdir(parents=True, exist_ok=True)
    depth = make_bases(models, args.bases, args.default_model, work / "source")
    embedded = EmbeddedRedis(home)
    url = embedded.start()
    redis = Redis.from_url(url)
    env = {**os.environ, "STRATA_HOME": str(home), "REDIS_URL": url, "HF_HUB_OFFLINE": "1"}
    results: dict[str, list[dict]] = {"shared": [], "routed": []}
    try:
        for repeat in range(args.repeats):
            for mode in ("shared", "routed"):
                redis.flushdb()
                logs = work / f"logs-{mode}-{repeat}"
                logs.mkdir(parents=True, exist_ok=True)
                workers = start_workers(args.workers, env, args.max_models, logs)
                try:
                    wait_ready(redis, args.workers)
                    result = run_mode(redis, mode, args, depth)
                finally:
                    stop_workers(workers)
                result["loads"] = loads(logs)
                results[mode].append(result)
                print(
                    f"{mode:>6} #{repeat}: {result['tok_s']:.1f} tok/s, p50 {result['p50']:.2f} s, "
                    f"p99 {result['p99']:.2f} s, {result['loads']} loads",
                    flush=True,
                )
    finally:
        embedded.stop()
    mean = {m: {k: statistics.mean(r[k] for r in rs) for k in rs[0]} for m, rs in results.items()}
    print(f"load average: {os.getloadavg()[0]:.1f}")
    routed, shared = mean["routed"], mean["shared"]
    print(
        f"routing_by_base: routed_vs_shared_throughput={routed['tok_s'] / shared['tok_s']:.3f} "
        f"p99_routed_vs_shared={routed['p99'] / shared['p99']:.3f} "
        f"loads_shared={shared['loads']:.1f} loads_routed={routed['loads']:.1f}"
    )


if __name__ == "__main__":
    main()
