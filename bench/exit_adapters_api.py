"""Exit adapters through the HTTP API on the default model, as a user runs them:

    python -m bench.exit_adapters_api [--home DIR] [--port 8765] [--job '{"bundled": "everyday", ...}']

1. starts `strata serve` on embedded defaults (its own STRATA_HOME; the default model is registered and
   profiled in the background), waits for it;
2. runs the default `fit_exits` job on the default model (ridge, every exit; `--job` adds or overrides
   fields of the job, e.g. distillation) and times it end to end (the job includes the fresh profile);
3. tight budgets: for chat prompts, a latency budget half-way between the predicted latencies of exits k and
   k + 1 (k = 70 % and 80 % of depth, from the model's profile), and reports the exit chosen, whether its
   adapter was used, the answer and the predicted and measured latency;
4. a quality floor: `max_perplexity_ratio` 3 with a budget that only a shallow exit fits, best effort; the
   chosen exit's profiled ratio must not exceed 3;
5. self-speculative decoding at full depth drafting with an adapted exit (and with the adapter off), greedy:
   acceptance rate and tokens per second against plain full-depth decoding, and that the text is identical.
Prints everything and writes OUT/results.json (--out).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from workers.generation.latency import LatencyProfile  # noqa: E402

MODEL = "smollm2-135m-instruct"
PROMPTS = [
    "What is the capital of Japan?",
    "Give me two tips for sleeping better.",
    "Write one sentence about the ocean.",
]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def serve(home: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "STRATA_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    env.pop("REDIS_URL", None)
    command = [sys.executable, "-m", "service.cli", "serve", "--port", str(port)]
    log_file = open(home / "serve.log", "w")  # noqa: SIM115 - lives as long as the server
    return subprocess.Popen(command, env=env, cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT)


def wait_ready(client: httpx.Client, process: subprocess.Popen, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"strata serve exited with {process.returncode}")
        try:
            health = client.get("/health").json()
            if (
                health.get("inference_workers", 0) >= 1
                and client.get(f"/v1/models/{MODEL}").status_code == 200
            ):
                return
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(2)
    raise RuntimeError("strata serve did not become ready")


def wait_job(client: httpx.Client, job_id: str) -> dict:
    while True:
        job = client.get(f"/v1/jobs/{job_id}", params={"wait": 60}).json()
        if job["status"] in ("finished", "failed"):
            return job
        log(f"  job {job['status']}: {job.get('progress')} {job.get('message', '')}")


def wait_profile(client: httpx.Client, timeout: float = 900) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = client.get(f"/v1/models/{MODEL}").json()["strata"]
        if record.get("profile"):
            return record
        time.sleep(5)
    raise RuntimeError("no profile")


def chat(client: httpx.Client, prompt: str, **extra) -> dict:
    body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_new_tokens": 32, **extra}
    answer = client.post("/v1/generate", json=body)
    return {
        "status": answer.status_code,
        **(answer.json() if answer.status_code == 200 else {"error": answer.text}),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", type=Path, help="STRATA_HOME (default: a new temporary directory)")
    parser.add_argument("--out", type=Path, default=Path("exit-adapters-api"))
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--job", type=json.loads, default={}, help="more fit_exits fields, as a JSON object")
    args = parser.parse_args(argv)
    home = args.home or Path(tempfile.mkdtemp(prefix="strata-api-"))
    home.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {"load_before": os.getloadavg(), "home": str(home)}
    process = serve(home, args.port)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{args.port}", timeout=900) as client:
            wait_ready(client, process)
            log("serving; waiting for the background profile")
            wait_profile(client)
            started = time.monotonic()
            body = {"kind": "fit_exits", "model": MODEL, **args.job}
            results["job"] = body
            response = client.post("/v1/jobs", json=body)
            if response.status_code != 202:
                raise RuntimeError(f"fit_exits was refused: {response.text}")
            job = response.json()
            final = wait_job(client, job["id"])
            if final["status"] != "finished":
                raise RuntimeError(f"fit_exits failed: {final.get('error')}")
            results["fit_exits"] = {
                "seconds_end_to_end": round(time.monotonic() - started, 1),
                "fit": final["result"]["fit"],
                "data": final["result"]["data"],
                "load_after": os.getloadavg(),
            }
            log(f"fit_exits finished in {results['fit_exits']['seconds_end_to_end']} s")
            record = client.get(f"/v1/models/{MODEL}").json()["strata"]
            layers = record["num_layers"]
            latency = LatencyProfile.model_validate(record["profile"]["latency"])
            quality = record["profile"]["quality"]
            full_ppl = quality[str(layers)]["perplexity"]
            results["quality"] = {
                k: {
                    "plain_ratio": q["perplexity"] / full_ppl,
                    "adapter_ratio": (q.get("adapter_perplexity") or 0) / full_ppl,
                }
                for k, q in quality.items()
            }
            tokenizer_len = (
                30  # prompt tokens of these chat prompts, roughly: only the budget midpoint needs it
            )
            budgets = []
            for fraction in (0.7, 0.8):
                k = round(fraction * layers)
                low, high = (latency.predict(d, tokenizer_len, 32) for d in (k, k + 1))
                budgets.append((k, round((low + high) / 2, 1)))
            tight = []
            for k, budget in budgets:
                for prompt in PROMPTS:
                    answer = chat(client, prompt, latency_budget_ms=budget)
                    strata = answer.get("strata", {})
                    tight.append(
                        {
                            "target_exit": k,
                            "budget_ms": budget,
                            "prompt": prompt,
                            "depth": strata.get("depth"),
                            "exit_adapter": strata.get("exit_adapter"),
                            "predicted_ms": strata.get("predicted_ms"),
                            "elapsed_ms": strata.get("elapsed_ms"),
                            "text": answer.get("text"),
                        }
                    )
                    shown = f"depth {strata.get('depth')} adapter {strata.get('exit_adapter')}"
                    log(f"budget {budget} ms -> {shown}: {answer.get('text')!r}")
            results["tight_budgets"] = tight
            shallow_budget = round(latency.predict(max(1, layers // 3), tokenizer_len, 32), 1)
            floor = chat(client, PROMPTS[0], latency_budget_ms=shallow_budget, max_perplexity_ratio=3.0)
            strata = floor.get("strata", {})
            results["quality_floor"] = {
                "budget_ms": shallow_budget,
                "status": floor["status"],
                "depth": strata.get("depth"),
                "served_quality": strata.get("quality"),
                "text": floor.get("text"),
            }
            log(f"floor 3x at {shallow_budget} ms -> {results['quality_floor']}")
            spec = []
            plain = chat(client, PROMPTS[1], depth=layers, max_new_tokens=64)
            for draft in (round(0.8 * layers), round(0.9 * layers)):
                for adapter in (True, False):
                    answer = chat(
                        client,
                        PROMPTS[1],
                        depth=layers,
                        max_new_tokens=64,
                        exit_adapter=adapter,
                        speculative={"draft_depth": draft, "num_draft_tokens": 3},
                    )
                    s = answer["strata"]
                    row = {
                        "draft_depth": draft,
                        "exit_adapter": adapter,
                        "speculative": s.get("speculative"),
                        "elapsed_ms": s.get("elapsed_ms"),
                        "plain_elapsed_ms": plain["strata"].get("elapsed_ms"),
                        "same_text": answer["text"] == plain["text"],
                    }
                    spec.append(row)
                    log(f"speculative {row}")
            results["speculative"] = spec
            results["load_end"] = os.getloadavg()
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
        (args.out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
