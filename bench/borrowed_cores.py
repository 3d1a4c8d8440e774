"""What lending the idle inference cores to a job gains the job and costs a request:

    python -m bench.borrowed_cores --model DIR [--seconds 60] [--gap 4] [--rounds 2] [--new-tokens 32]

Two processes share the machine as in `strata serve` (workers/threads.py: on C cores, inference gets half
of them, the job the rest). The job process runs what a fit_exits job spends most of its time on, forward
passes over all exits of 4 windows of 256 tokens with the ridge statistics of every exit
(workers.early_exit.fit), for `--seconds`; it borrows the inference threads while no inference is busy
(workers.jobs.borrowed_cores, the real watcher on a real embedded Redis) or not, by mode. This process is
the inference worker: an int8 engine on the inference threads that marks itself busy around each request
(workers.inference.activity, as the worker does) and generates `--new-tokens` greedy tokens at full depth
every `--gap` seconds. Modes, interleaved over `--rounds`:

- `requests alone`: no job, the requests' latency on an otherwise idle machine;
- `job, own cores`: the job on its own threads only (how jobs ran before borrowing);
- `job, borrowing`: the job borrows the inference threads between requests;
- `job alone, borrowing`: no requests, the job on every core (the most a fit gains).

Prints a table (forward passes per minute, request latency median / p90 / max) and one summary line: the
job's speed borrowing against its own cores, and the requests' median and p90 latency borrowing against
own cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MODES = ("requests alone", "job, own cores", "job, borrowing", "job alone, borrowing")


def job_process(model: Path, seconds: float) -> None:
    """The job side (run in a child with the job worker's environment): forward passes until `seconds`."""
    import torch
    from redis import Redis

    from workers.early_exit.fit import RidgeAccumulator
    from workers.early_exit.forward import residual_at_exits
    from workers.jobs.borrowed_cores import job_borrower
    from workers.jobs.models import load_model
    from workers.threads import apply_budget

    apply_budget()
    network, _ = load_model(model)
    layers = network.config.num_hidden_layers
    hidden = network.config.hidden_size
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, network.config.vocab_size, (4, 256), generator=generator)
    borrower = job_borrower(Redis.from_url(os.environ["REDIS_URL"]), "bench-job")
    with torch.no_grad():
        residual_at_exits(network, ids, [layers])  # warm
        print("ready", flush=True)
        borrower.start()
        passes, started = 0, time.monotonic()
        while time.monotonic() - started < seconds:
            residual = residual_at_exits(network, ids, list(range(1, layers + 1)))
            final = residual[layers].reshape(-1, hidden).float()
            for k in range(1, layers):
                RidgeAccumulator(hidden).add(residual[k].reshape(-1, hidden).float(), final)
            passes += 1
        elapsed = time.monotonic() - started
        borrower.stop()
    print(json.dumps({"passes": passes, "seconds": elapsed, "changes": borrower.changes}), flush=True)


def run_mode(args, mode: str, url: str, engine, prompt: list[int], budgets: tuple[int, int, int]) -> dict:
    from redis import Redis

    from workers.generation.engine import GenerationRequest
    from workers.inference.activity import clear_serving, mark_serving
    from workers.threads import worker_environment

    own, infer, borrow = budgets
    redis = Redis.from_url(url)
    redis.flushdb()
    child = None
    if mode != "requests alone":
        env = {
            **os.environ,
            **worker_environment(own, borrow if "borrowing" in mode else 0, infer),
            "REDIS_URL": url,
        }
        command = [sys.executable, "-m", "bench.borrowed_cores", "--job", "--model", str(args.model)]
        command += ["--seconds", str(args.seconds)]
        child = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True)
        if child.stdout.readline().strip() != "ready":
            raise RuntimeError("the job process did not start")
    latencies: list[float] = []
    started = time.monotonic()
    if mode == "job alone, borrowing":
        time.sleep(args.seconds)
    else:
        while time.monotonic() - started < args.seconds - args.gap:
            time.sleep(args.gap)
            request = GenerationRequest(
                prompt_ids=prompt, depth=engine.num_layers, max_new_tokens=args.new_tokens, ignore_eos=True
            )
            mark_serving(redis, "bench-infer")
            t = time.perf_counter()
            engine.run([request])
            latencies.append((time.perf_counter() - t) * 1000)
            clear_serving(redis, "bench-infer")
    out: dict = {"mode": mode, "latencies_ms": latencies}
    if child is not None:
        line = child.stdout.read().strip().splitlines()[-1]
        child.wait()
        out.update(json.loads(line))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--gap", type=float, default=4.0, help="seconds between requests")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--job", action="store_true", help=argparse.SUPPRESS)  # the child's role
    args = parser.parse_args()
    if args.job:
        job_process(args.model, args.seconds)
        return

    import torch

    from service.embedded_redis import EmbeddedRedis
    from workers.inference.worker import load_engine
    from workers.threads import borrowable, default_budgets

    own, infer = default_budgets(1, 1)
    borrow = borrowable(own, infer, 1)
    if borrow < 1:
        raise SystemExit("nothing to borrow on this machine")
    torch.set_num_threads(infer)
    engine = load_engine(args.model, precision="int8", serve_only=True)
    prompt = engine.tokenizer.encode("The history of the printing press begins")
    home = Path(tempfile.mkdtemp(prefix="borrow-bench-"))
    embedded = EmbeddedRedis(home)
    url = embedded.start()
    load_before = os.getloadavg()
    runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
    try:
        for _ in range(args.rounds):
            for mode in MODES:
                runs[mode].append(run_mode(args, mode, url, engine, prompt, (own, infer, borrow)))
    finally:
        embedded.stop()
    print(
        f"\njob: {own} own thread(s) + {borrow} borrowed; inference: {infer} thread(s), int8, full depth, "
        f"{args.new_tokens} tokens every {args.gap} s; {args.rounds} rounds of {args.seconds:.0f} s a mode; "
        f"load {load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after\n"
    )
    print("| mode | forward passes / min | requests | median ms | p90 ms | max ms |")
    print("|---|---:|---:|---:|---:|---:|")
    rates, medians, p90s = {}, {}, {}
    for mode, done in runs.items():
        latencies = sorted(x for run in done for x in run["latencies_ms"])
        passes = sum(run.get("passes", 0) for run in done)
        seconds = sum(run.get("seconds", 0.0) for run in done)
        rates[mode] = 60 * passes / seconds if seconds else None
        medians[mode] = statistics.median(latencies) if latencies else None
        p90s[mode] = latencies[min(len(latencies) - 1, int(0.9 * len(latencies)))] if latencies else None
        cells = [
            f"{rates[mode]:.1f}" if rates[mode] else "-",
            str(len(latencies)),
            *(f"{v:.0f}" if v else "-" for v in (medians[mode], p90s[mode], max(latencies, default=None))),
        ]
        print(f"| {mode} | " + " | ".join(cells) + " |")
    own_mode, borrowing = "job, own cores", "job, borrowing"
    print(
        f"\nborrowed cores: job {rates[borrowing] / rates[own_mode]:.2f}x its own cores' speed with requests "
        f"every {args.gap} s ({rates['job alone, borrowing'] / rates[own_mode]:.2f}x without); requests' "
        f"median {medians[borrowing] / medians[own_mode]:.2f}x, p90 {p90s[borrowing] / p90s[own_mode]:.2f}x "
        f"those beside a job on its own cores ({medians['requests alone']:.0f} ms alone)"
    )


if __name__ == "__main__":
    main()
