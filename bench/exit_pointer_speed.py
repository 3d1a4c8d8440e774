"""What an exit's pointer (workers/early_exit/pointer.py) costs when serving: the engine's prefill and decode
time at each exit with the pointers of the model's adapters and without them (the same adapters, pointers
dropped), interleaved in one process, greedy, one request at a time.

    python -m bench.exit_pointer_speed --model DIR [--base MODEL_DIR] [--exits 15,21,24,27]
                                       [--prompt-tokens 200] [--new-tokens 64] [--repeats 3]
                                       [--precision float32] [--threads 0]

The prompt is the start of the dpkg specification (the out-of-domain held-out text). Prints a table (median
prefill ms, decode tokens/s, each with the pointer and without) and one summary line: decode speed with the
pointer as a fraction of without, and the prefill time it adds, per exit.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from workers.early_exit.adapters import load_adapters
from workers.early_exit.forward import num_layers
from workers.eval.heldout import heldout_texts
from workers.generation.engine import EarlyExitEngine, GenerationRequest
from workers.jobs.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, required=True, help="a directory with exit adapters")
    parser.add_argument("--base", type=Path, help="the model, when --model holds adapters alone")
    parser.add_argument("--exits", default="15,21,24,27")
    parser.add_argument("--prompt-tokens", type=int, default=200)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precision", default="float32")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.base or args.model)
    adapters = load_adapters(args.model, num_layers(model), model.config.hidden_size)
    if adapters is None:
        raise SystemExit(f"{args.model} has no exit adapters")
    exits = [int(k) for k in args.exits.split(",")]
    if not all(adapters.pointer(k) is not None for k in exits):
        raise SystemExit("every --exits exit needs an adapter with a pointer")
    engines = {
        "pointer": EarlyExitEngine(model, tokenizer, precision=args.precision, adapters=adapters),
        "none": EarlyExitEngine(
            model, tokenizer, precision=args.precision, adapters=adapters.without_pointers()
        ),
    }
    prompt = tokenizer.encode(heldout_texts()["dpkg-spec"].text)[: args.prompt_tokens]
    timings: dict[tuple[int, str], list[tuple[float, float]]] = {}
    for _ in range(args.repeats + 1):  # the first round warms up and is dropped
        for k in exits:
            for name, engine in engines.items():
                request = GenerationRequest(
                    prompt_ids=prompt, depth=k, max_new_tokens=args.new_tokens, ignore_eos=True
                )
                result = engine.run([request])[0]
                rate = (len(result.token_ids) - 1) / (result.decode_ms / 1000)
                timings.setdefault((k, name), []).append((result.prefill_ms, rate))
    print(
        f"prompt {len(prompt)} tokens of dpkg-spec, {args.new_tokens} new, {args.precision}, "
        f"{torch.get_num_threads()} threads; medians of {args.repeats}\n"
    )
    print("| exit | prefill ms, pointer | prefill ms, none | tok/s, pointer | tok/s, none | ratio |")
    print("|---:|---:|---:|---:|---:|---:|")
    summary = []
    for k in exits:
        med = {
            name: (
                statistics.median(p for p, _ in timings[(k, name)][1:]),
                statistics.median(r for _, r in timings[(k, name)][1:]),
            )
            for name in engines
        }
        ratio = med["pointer"][1] / med["none"][1]
        print(
            f"| {k} | {med['pointer'][0]:.1f} | {med['none'][0]:.1f} | {med['pointer'][1]:.1f} | "
            f"{med['none'][1]:.1f} | {ratio:.2f} |"
        )
        summary.append(f"{k}: {ratio:.2f} ({med['pointer'][0] - med['none'][0]:+.0f} ms prefill)")
    print("\nexit_pointer_speed: decode speed with pointer / without, by exit: " + ", ".join(summary))


if __name__ == "__main__":
    main()
