"""Decoding speed on a CUDA GPU: Strata's engine (CUDA graphs) per exit depth and precision, against HF
`generate` (eager, its default dynamic cache) on the same GPU.

    python bench/generate_gpu.py --model DIR        # a model directory (e.g. the converted default model)
    python bench/generate_gpu.py --quick            # a tiny random model: a smoke test (CPU when no GPU)

Greedy, `--new-tokens` (128) new tokens after a `--prompt-tokens` (200) token prompt, batch 1 and
`--batch` (8) rows. Each round runs every configuration once, one at a time in this process; figures are
medians over `--rounds` (3). Strata's decode tok/s comes from its own step timings (the clock waits for the
GPU), HF's from two `generate` calls (1 token, then all; the difference is decode). Rows:

- strata, bfloat16 and float32, every depth in `--depths` (default 100/80/60/40/20 % of L), CUDA graphs;
- strata, bfloat16, full depth, eager (graphs off): what the graphs buy;
- strata, bfloat16, full depth, `--batch` rows: tokens per second over all rows;
- HF generate, bfloat16 and float32, full depth (and `--batch` rows in bfloat16).

Exactness: at float32, Strata's greedy tokens at full depth equal HF `generate`'s, and at every depth the
first `--check-tokens` equal the uncached reference. Ends with one line:

    gpu_decode: full_vs_hf_eager=<x> exit60_vs_hf_eager=<x> graphs_vs_eager=<x> batch_vs_hf=<x>
                exact_fp32=<bool>

(one line) where full_vs_hf_eager is Strata's fastest full-depth batch-1 rate over HF's (target >= 10).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.generate_vs_llamacpp import Series, hf_run, load, prompt_ids, strata_run, tiny_model  # noqa: E402
from bench.merge_vs_mergekit import load_average, machine  # noqa: E402
from workers.device import describe_device  # noqa: E402
from workers.generation.engine import EarlyExitEngine, GenerationRequest  # noqa: E402
from workers.generation.reference import greedy_reference  # noqa: E402

PRECISIONS = ("bfloat16", "float32")


def strata_batch(engine: EarlyExitEngine, prompt: list[int], rows: int, new_tokens: int) -> float:
    """Tokens per second over `rows` copies of the prompt decoded as one batch at full depth."""
    requests = [
        GenerationRequest(
            prompt_ids=prompt, depth=engine.num_layers, max_new_tokens=new_tokens, ignore_eos=True
        )
        for _ in range(rows)
    ]
    results = engine.run(requests)
    return rows * (new_tokens - 1) / max(r.decode_ms for r in results) * 1000


def hf_batch(model, prompt: list[int], rows: int, new_tokens: int) -> float:
    device = next(model.parameters()).device
    ids = torch.tensor([prompt] * rows, device=device)
    kwargs = {"do_sample": False, "pad_token_id": 0}
    with torch.inference_mode():
        torch.cuda.synchronize(device) if device.type == "cuda" else None
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=1, **kwargs)
        torch.cuda.synchronize(device) if device.type == "cuda" else None
        first = time.perf_counter()
        model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
        torch.cuda.synchronize(device) if device.type == "cuda" else None
        end = time.perf_counter()
    return rows * (new_tokens - 1) / max(1e-9, (end - first) - (first - start))


def main(argv: list[str] | None = None) -> int:  # noqa: C901
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="a model directory")
    parser.add_argument("--quick", action="store_true", help="a tiny random model")
    parser.add_argument("--rounds", type=int, help="rounds (default 3, quick 1)")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=200)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--depths", type=int, nargs="+", help="exits (default: 100/80/60/40/20 percent)")
    parser.add_argument("--check-tokens", type=int, default=16)
    args = parser.parse_args(argv)
    if not (args.model or args.quick):
        parser.error("give --model DIR or --quick")
    rounds = args.rounds or (1 if args.quick else 3)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    started = datetime.datetime.now().astimezone()
    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="strata-gpu-bench-") as tmp:
        model_dir = tiny_model(Path(tmp)) if args.quick else args.model
        model, tokenizer = load(model_dir)
        model.to(device)
        hf_bf16 = copy.deepcopy(model).to(torch.bfloat16)
        layers = model.config.num_hidden_layers
        exit60 = max(1, round(0.6 * layers))
        depths = args.depths or [max(1, round(layers * f)) for f in (1.0, 0.8, 0.6, 0.4, 0.2)]
        depths = sorted(set(depths) | {layers, exit60}, reverse=True)
        prompt = prompt_ids(tokenizer, args.prompt_tokens, model.config.vocab_size)
        engines = {p: EarlyExitEngine(model, tokenizer, device=device, precision=p) for p in PRECISIONS}
        eager = EarlyExitEngine(model, tokenizer, device=device, precision="bfloat16", cuda_graphs=False)
        batched = EarlyExitEngine(
            model, tokenizer, device=device, precision="bfloat16", max_batch_size=args.batch
        )
        strata = {(p, d): Series() for p in PRECISIONS for d in depths}
        eager_series, hf = Series(), {p: Series() for p in PRECISIONS}
        batch_rates: dict[str, list[float]] = {"strata": [], "hf": []}
        # warm-up at the measured sizes: caches, graphs (captured outside the timed rounds), kernels
        for engine in engines.values():
            for depth in depths:
                strata_run(engine, prompt, depth, args.new_tokens)
        strata_run(eager, prompt, layers, args.new_tokens)
        strata_batch(batched, prompt, args.batch, args.new_tokens)
        hf_run(model, prompt[:16], 2)
        hf_run(hf_bf16, prompt[:16], 2)
        for r in range(rounds):
            for (precision, depth), series in strata.items():
                series.add(*strata_run(engines[precision], prompt, depth, args.new_tokens))
            eager_series.add(*strata_run(eager, prompt, layers, args.new_tokens))
            hf["float32"].add(*hf_run(model, prompt, args.new_tokens))
            hf["bfloat16"].add(*hf_run(hf_bf16, prompt, args.new_tokens))
            batch_rates["strata"].append(strata_batch(batched, prompt, args.batch, args.new_tokens))
            batch_rates["hf"].append(hf_batch(hf_bf16, prompt, args.batch, args.new_tokens))
            print(f"round {r + 1}/{rounds} done", flush=True)
        exact_full = strata[("float32", layers)].tokens == hf["float32"].tokens
        exact_depths = True
        for depth in depths:
            n = min(args.check_tokens, args.new_tokens)
            exact_depths &= strata[("float32", depth)].tokens[:n] == greedy_reference(model, prompt, depth, n)
        graphs = engines["bfloat16"].graphs
        captures = graphs.captures if graphs is not None else 0
    load_after = load_average()

    hf_best = max(series.tok_s for series in hf.values())
    graphed = "strata (CUDA graphs)" if captures else "strata"
    lines = [
        "| engine | precision | depth | rows | decode tok/s | x HF generate (fastest) | first token ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for (precision, depth), series in strata.items():
        lines.append(
            f"| {graphed} | {precision} | {depth} | 1 | {series.tok_s:.1f} | "
            f"{series.tok_s / hf_best:.2f} | {series.ttft_ms:.1f} |"
        )
    lines.append(
        f"| strata (eager) | bfloat16 | {layers} | 1 | {eager_series.tok_s:.1f} | "
        f"{eager_series.tok_s / hf_best:.2f} | {eager_series.ttft_ms:.1f} |"
    )
    strata_batch_rate = statistics.median(batch_rates["strata"])
    hf_batch_rate = statistics.median(batch_rates["hf"])
    lines.append(
        f"| {graphed} | bfloat16 | {layers} | {args.batch} | {strata_batch_rate:.1f} | "
        f"{strata_batch_rate / hf_best:.2f} | |"
    )
    for precision, series in hf.items():
        lines.append(
            f"| HF generate (eager) | {precision} | {layers} | 1 | {series.tok_s:.1f} | "
            f"{series.tok_s / hf_best:.2f} | {series.ttft_ms:.1f} |"
        )
    lines.append(
        f"| HF generate (eager) | bfloat16 | {layers} | {args.batch} | {hf_batch_rate:.1f} | "
        f"{hf_batch_rate / hf_best:.2f} | |"
    )
    fastest = max(PRECISIONS, key=lambda p: strata[(p, layers)].tok_s)
    full_ratio = strata[(fastest, layers)].tok_s / hf_best
    exit_ratio = strata[(fastest, exit60)].tok_s / hf_best
    graph_ratio = strata[("bfloat16", layers)].tok_s / eager_series.tok_s
    exact = bool(exact_full and exact_depths)
    label = "a tiny random LLaMA" if args.quick else f"{model_dir.name}"
    command = " ".join(["python bench/generate_gpu.py", *(sys.argv[1:] if argv is None else argv)])
    out = [
        "",
        f"date: {started:%Y-%m-%d %H:%M %Z}",
        f"device: {describe_device(device)}; host: {machine()}; torch {torch.__version__}",
        f"command: {command}",
        f"load average (1, 5, 15 min): {load_before} before, {load_after} after",
        f"model: {label}, {layers} layers; greedy, {args.prompt_tokens}-token prompt, {args.new_tokens} new "
        f"tokens, medians of {rounds} round(s); {captures} graphs captured by the bfloat16 engine",
        "",
        *lines,
        "",
        f"exactness: float32 full depth == HF generate: {exact_full}; first {args.check_tokens} tokens at "
        f"every depth == uncached reference: {exact_depths}",
        "",
        f"gpu_decode: full_vs_hf_eager={full_ratio:.2f} exit60_vs_hf_eager={exit_ratio:.2f} "
        f"graphs_vs_eager={graph_ratio:.2f} batch_vs_hf={strata_batch_rate / hf_batch_rate:.2f} "
        f"exact_fp32={'true' if exact else 'false'}",
    ]
    print("\n".join(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
