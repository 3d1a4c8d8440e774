"""Many variants of one base at the cost of one: a resident base + per-variant deltas, against one model
alone and against today's full copies (an LRU of two loaded models).

    .venv/bin/python bench/many_variants.py [--work-dir DIR] [--variants 1 4 16 64] [--repeats 2]
    .venv/bin/python bench/many_variants.py --quick          # a tiny random model, N = 1, 4: a smoke run

Load, as the issue states it: requests round-robin over N variants, 4 at a time (4 clients, each sending
its next request when its last one is answered: the inference worker takes the 4 waiting requests as one
batch), 32 new tokens each, full depth, the worker's default precision. Per mode: aggregate decode tok/s,
p50/p99 latency (a request's wave from start to its finish), resident weight bytes.

- single:  every request to the base itself (one model);
- deltas:  the N variants as low-rank deltas (the `variants` job's rank-r perturbation) over one resident
           base, mixed in one batch (workers.generation.deltas);
- copies:  today's behaviour: each variant a full model, an LRU of two engines, a request group per
           model, a model loaded from disk when it is not resident (run where N <= --max-copies: N full
           copies must fit the disk).

Modes run interleaved (single, deltas, copies, single, ...) so a busy machine slows them alike; ratios are
what to read. Quality: `--quality` variants (one dense, the rest low rank) are written as full models by
workers.variants, stored as deltas at the default error budget (workers.variants_delta), materialised, and
compared to their full versions on the held-out text: perplexity and greedy top-1 agreement.

Summary: many_variants: n=16 throughput_vs_single=<x> p99_vs_single=<x> bytes_per_variant_vs_base=<x>
ppl_delta_max=<x>
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.random_llama import TINY, write_character_tokenizer, write_random_llama  # noqa: E402
from workers.default_model import convert_default_model  # noqa: E402
from workers.eval.texts import heldout_text  # noqa: E402
from workers.generation.deltas import LowRankDelta, RowDeltas, build_variant  # noqa: E402
from workers.generation.engine import EarlyExitEngine, GenerationRequest  # noqa: E402
from workers.inference.worker import load_engine  # noqa: E402
from workers.merge.executor import tensor_seed  # noqa: E402
from workers.tensors.safetensors_io import TensorReader  # noqa: E402
from workers.variants import make_variant, random_low_rank_factors  # noqa: E402
from workers.variants_delta import compress_variant, materialise  # noqa: E402

CONCURRENT = 4
PROMPTS = [
    "The capital of France is",
    "Write a short note about rain.",
    "Three facts about the moon:",
    "My favourite breakfast is",
]


def tensor_stats(reader: TensorReader) -> dict[str, tuple[tuple[int, ...], float]]:
    """Each tensor's shape and rms (what the `variants` job scales its perturbation by), read once."""
    return {
        name: (tuple(reader.entries[name].shape), float(reader.load(name).float().pow(2).mean().sqrt()))
        for name in reader.names
    }


def in_memory_variant(engine: EarlyExitEngine, stats: dict, seed: int, scale: float, rank: int):
    """The `variants` job's rank-r perturbation of every tensor (dense for vectors), held as factors."""
    deltas: dict = {}
    dtype = engine.compact.dtype
    for name, (shape, rms) in stats.items():
        generator = torch.Generator().manual_seed(tensor_seed(seed, name, 0))
        if len(shape) == 2:
            left, right = random_low_rank_factors(shape, rms, scale, rank, generator)
            deltas[name] = LowRankDelta(right, left, dtype)
        else:
            deltas[name] = scale * rms * torch.randn(shape, generator=generator)
    return build_variant(f"v{seed}", engine.compact, deltas)


def requests_for(
    prompts: list[list[int]], models: list[str | None], new_tokens: int, depth: int
) -> list[GenerationRequest]:
    return [
        GenerationRequest(
            prompt_ids=prompts[i % len(prompts)],
            depth=depth,
            max_new_tokens=new_tokens,
            ignore_eos=True,
            variant=model,
        )
        for i, model in enumerate(models)
    ]


def waves(requests: list, serve) -> tuple[float, list[float]]:
    """Serve requests CONCURRENT at a time with `serve(wave) -> tokens`; (tok/s, latencies in s)."""
    latencies, tokens, start = [], 0, time.perf_counter()
    for i in range(0, len(requests), CONCURRENT):
        wave_start = time.perf_counter()
        done = serve(requests[i : i + CONCURRENT])
        for finished_at, count in done:
            latencies.append(finished_at - wave_start)
            tokens += count
    return tokens / (time.perf_counter() - start), latencies


def run_engine(engine: EarlyExitEngine):
    def serve(wave):
        out = []
        for event in engine.generate(wave):
            if hasattr(event, "finish_reason"):
                out.append((time.perf_counter(), len(event.token_ids)))
        return out

    return serve


class FullCopies:
    """Today's worker: an LRU of two engines, one group per model, a model loaded when not resident."""

    def __init__(self, dirs: dict[str, Path], batch: int) -> None:
        self.dirs, self.batch = dirs, batch
        self.engines: OrderedDict[str, EarlyExitEngine] = OrderedDict()
        self.loads = 0

    def engine(self, model: str) -> EarlyExitEngine:
        if model in self.engines:
            self.engines.move_to_end(model)
            return self.engines[model]
        self.loads += 1
        engine = load_engine(self.dirs[model], max_batch_size=self.batch)
        self.engines[model] = engine
        while len(self.engines) > 2:
            self.engines.popitem(last=False)
        return engine

    def serve(self, wave):
        groups: dict[str, list] = {}
        for request in wave:
            groups.setdefault(request.variant, []).append(request.model_copy(update={"variant": None}))
        out = []
        for model, group in groups.items():
            out += run_engine(self.engine(model))(group)
        return out


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


@torch.inference_mode()
def quality(full_dir: Path, compressed_dir: Path, text: str, max_tokens: int) -> tuple[float, float, float]:
    """(ppl of the full variant, ppl of the compressed one, greedy top-1 agreement) on held-out text."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(full_dir)
    ids = torch.tensor([tokenizer.encode(text)[:max_tokens]])
    out = []
    for directory in (full_dir, compressed_dir):
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
        logits = model(ids).logits[0, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:])
        out.append((float(nll.exp()), logits.argmax(-1)))
        del model
    agreement = float((out[0][1] == out[1][1]).float().mean())
    return out[0][0], out[1][0], agreement


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work-dir", type=Path, help="keeps the converted base between runs")
    parser.add_argument("--variants", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--requests", type=int, default=16, help="requests per mode and N")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--scale", type=float, default=0.05)
    parser.add_argument("--max-copies", type=int, default=4, help="full-copy baseline only up to this N")
    parser.add_argument("--quality", type=int, default=2, help="variants checked for perplexity/agreement")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.variants, args.requests, args.new_tokens, args.repeats = [1, 4], 8, 8, 1
        args.max_copies = 4
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work_dir or Path(tmp)
        base_dir = work / ("tiny-base" if args.quick else "smol")
        if not (base_dir / "config.json").exists():
            if args.quick:
                write_random_llama(base_dir, {**TINY, "vocab_size": 99}, seed=0)
                write_character_tokenizer(base_dir)
            else:
                convert_default_model(base_dir)
        run(args, work, base_dir)


def run(args, work: Path, base_dir: Path) -> None:
    batch = CONCURRENT
    engine = load_engine(base_dir, max_batch_size=batch, precision=args.precision)
    layers = engine.num_layers
    prompts = [engine.tokenizer.encode(p) for p in PROMPTS]
    load = os.getloadavg()[0]
    print(
        f"precision {engine.precision}, torch threads {torch.get_num_threads()}, load {load:.1f}, "
        f"{args.requests} requests x {args.new_tokens} tokens, {CONCURRENT} concurrent, depth {layers}"
    )
    base_bytes = engine.compact.weight_bytes(layers) + engine.compact.embed_weight.numel() * 4
    if engine.compact.tied_head:
        base_bytes -= engine.compact.embed_weight.numel() * 4 - engine.compact.head.bytes
    max_n = max(args.variants)
    with TensorReader(base_dir) as reader:
        stats = tensor_stats(reader)
    floats = [in_memory_variant(engine, stats, seed, args.scale, args.rank) for seed in range(1, max_n + 1)]
    held = [engine.add_variant(variant) for variant in floats]  # int8 factors on a quantised engine
    per_variant = statistics.mean(v.bytes for v in held)
    if held[0] is not floats[0]:
        agreement, ppl_ratio = served_agreement(engine, floats[0], held[0], heldout_text(), 256)
        print(
            f"served as held ({engine.precision} engine) vs float factors, variant v1, 256 held-out tokens: "
            f"top-1 agreement {agreement:.4f}, perplexity ratio {ppl_ratio:.5f}"
        )
    copies_dir = work / "copies"
    rows, results = [], {}
    for n in args.variants:
        names = [held[i % n].name for i in range(args.requests)]
        single_requests = requests_for(prompts, [None] * args.requests, args.new_tokens, layers)
        delta_requests = requests_for(prompts, names, args.new_tokens, layers)
        copies = None
        if 1 < n <= args.max_copies:  # one full copy is the single model
            dirs = {}
            for i in range(n):
                out = copies_dir / f"c{i + 1}"
                if not (out / "config.json").exists():
                    shutil.rmtree(out, ignore_errors=True)
                    out.mkdir(parents=True)
                    make_variant(base_dir, out, seed=i + 1, scale=args.scale, rank=args.rank)
                dirs[held[i].name] = out
            copies = FullCopies(dirs, batch)
        engine.run(single_requests[:1])  # warm-up
        measured: dict[str, list] = {"single": [], "deltas": [], "copies": []}
        for repeat in range(args.repeats):
            measured["single"].append(waves(single_requests, run_engine(engine)))
            measured["deltas"].append(waves(delta_requests, run_engine(engine)))
            if copies is not None and repeat == 0:  # loads from disk dominate it: once is enough
                measured["copies"].append(waves(delta_requests, copies.serve))
        summary = {}
        for mode, runs in measured.items():
            if not runs:
                continue
            rate = statistics.median(r[0] for r in runs)
            latencies = [x for r in runs for x in r[1]]
            summary[mode] = (rate, percentile(latencies, 0.5), percentile(latencies, 0.99))
        results[n] = summary
        resident = base_bytes + n * per_variant
        for mode, (rate, p50, p99) in summary.items():
            memory = {"single": base_bytes, "deltas": resident, "copies": min(n, 2) * base_bytes}[mode]
            rows.append((n, mode, rate, p50, p99, memory))
        if copies is not None:
            del copies
        line = " ".join(f"{mode} {r[0]:.1f} tok/s p99 {r[2]:.2f} s" for mode, r in summary.items())
        print(f"N={n}: {line} (load {os.getloadavg()[0]:.1f})", flush=True)
    print("| N | mode | tok/s | p50 s | p99 s | resident weight MB | tok/s vs single | p99 vs single |")
    print("|---|---|---|---|---|---|---|---|")
    for n, mode, rate, p50, p99, memory in rows:
        single = results[n]["single"]
        print(
            f"| {n} | {mode} | {rate:.1f} | {p50:.2f} | {p99:.2f} | {memory / 2**20:.1f} | "
            f"{rate / single[0]:.2f} | {p99 / single[2]:.2f} |"
        )
    print(
        f"resident: base {base_bytes / 2**20:.1f} MB, {max_n} variants held, "
        f"{per_variant / 2**20:.2f} MB each"
    )
    ppl_delta = quality_rows(args, work, base_dir)
    target = 16 if 16 in results else max(results)
    single, deltas = results[target]["single"], results[target]["deltas"]
    print(f"load after: {os.getloadavg()[0]:.1f}")
    print(
        f"many_variants: n={target} throughput_vs_single={deltas[0] / single[0]:.3f} "
        f"p99_vs_single={deltas[2] / single[2]:.3f} bytes_per_variant_vs_base={per_variant / base_bytes:.4f} "
        f"ppl_delta_max={ppl_delta:.5f}"
    )


@torch.inference_mode()
def served_agreement(
    engine: EarlyExitEngine, floats, held, text: str, max_tokens: int
) -> tuple[float, float]:
    """(greedy top-1 agreement, perplexity ratio) of the engine serving `held` (the variant as the engine
    holds it) against the same variant with its float factors, teacher-forced on held-out text."""
    ids = torch.tensor([engine.tokenizer.encode(text)[:max_tokens]])
    positions, depth = torch.arange(ids.shape[1])[None], engine.num_layers
    out = []
    for variant in (floats, held):
        cache = engine.compact.new_cache(depth, 1, ids.shape[1])
        rows = RowDeltas([variant], engine.device)
        logits = engine.compact.forward(ids, positions, cache, depth, last_only=False, deltas=rows)
        logits = logits[0, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:])
        out.append((logits.argmax(-1), float(nll.exp())))
    return float((out[0][0] == out[1][0]).float().mean()), out[1][1] / out[0][1]


def quality_rows(args, work: Path, base_dir: Path) -> float:
    """Perplexity and top-1 agreement of stored-as-delta variants against their full versions."""
    text = heldout_text()
    worst_ppl, worst_agree = 0.0, 1.0
    print(
        "| variant | delta forms | bytes vs base | ppl full | ppl compressed | ppl delta | top-1 agreement |"
    )
    print("|---|---|---|---|---|---|---|")
    for i in range(args.quality):
        rank = None if i == 0 else args.rank  # one dense fine-tune-like variant, the rest low rank
        scale = 1e-3 if rank is None else args.scale
        full = work / "quality" / f"q{i}"
        shutil.rmtree(full.parent / f"q{i}", ignore_errors=True)
        full.mkdir(parents=True)
        make_variant(base_dir, full, seed=100 + i, scale=scale, rank=rank)
        report = compress_variant(base_dir, full, full.parent / f"d{i}", base_id="base")
        restored = full.parent / f"m{i}"
        materialise(base_dir, full.parent / f"d{i}", restored)
        for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (full / name).exists():
                shutil.copyfile(full / name, restored / name)
        ppl_full, ppl_compressed, agreement = quality(full, restored, text, 512 if args.quick else 1024)
        delta = abs(ppl_compressed - ppl_full) / ppl_full
        worst_ppl, worst_agree = max(worst_ppl, delta), min(worst_agree, agreement)
        summary = report.summary()
        print(
            f"| {'dense' if rank is None else f'rank {rank}'} | {summary['forms']} | "
            f"{summary['bytes_vs_base']:.4f} | {ppl_full:.3f} | {ppl_compressed:.3f} | {delta:.5f} | "
            f"{agreement:.4f} |"
        )
        shutil.rmtree(full.parent, ignore_errors=True)
    print(f"quality: ppl_delta_max={worst_ppl:.5f} top1_agreement_min={worst_agree:.4f}")
    return worst_ppl


if __name__ == "__main__":
    main()
