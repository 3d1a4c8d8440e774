"""A per-token confidence exit (CALM, arXiv 2207.07061) against fixed exits, on a held-out text: quality
(perplexity as a ratio to full depth's) and cost per token, from the model's own exit adapters.

    python -m bench.confidence_exits --model DIR [--base MODEL_DIR] [--text dpkg-spec] [--tokens 2048]
                                     [--exits 15,21,24,27] [--thresholds 0.9,0.7,0.5,0.3]

The policy, teacher-forced token by token with a KV cache of every layer: run the layers up to the first
candidate exit k, read the exit's adapted distribution p_k = softmax(LMHead(s_k FinalNorm(A_k h_k + b_k)))
and stop there when its softmax margin p_(1) - p_(2) (CALM's "softmax response") is at least the threshold,
else run on to the next exit (full depth last). A token that stops at k still owes its keys and values to
layers k+1..L, which later tokens attend to: CALM's state propagation computes them from h_k itself (each
skipped layer reads h_k as its input), which is what `propagated` rows do; `full-KV` rows run the skipped
layers properly instead, the quality the policy would have if propagation cost nothing (an upper bound).

Cost: the policy pays its layers, one LM head per exit it checks (the margin needs the whole distribution)
and, per skipped layer, the key and value projections. From the engine's own timings of one decode step
(float32, this machine, `--threads`): ms per layer, per LM head, per K/V projection (a layer's fused QKV
product stands in: an upper bound). A fixed exit at k pays k layers and one head. Prints a table and one
summary line. Perplexity windows as `measure_quality`: 256 tokens overlapping by one.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from workers.early_exit.adapters import load_adapters
from workers.early_exit.forward import num_layers
from workers.eval.heldout import heldout_texts
from workers.generation.compact import CompactLlama
from workers.generation.profiler import measure_quality, scoring_windows
from workers.jobs.models import load_model

WINDOW = 256


@dataclass
class PolicyRun:
    nll: float = 0.0
    tokens: int = 0
    stops: dict[int, int] = field(default_factory=dict)  # exit -> tokens that stopped there
    checks: int = 0  # LM heads computed to read a margin (the full-depth head is not a check)
    filled: int = 0  # layers whose keys and values came from a stopped token's state

    @property
    def mean_layers(self) -> float:
        return sum(k * n for k, n in self.stops.items()) / self.tokens


def margin(logits: torch.Tensor) -> float:
    top = torch.softmax(logits.float(), -1).topk(2, dim=-1).values
    return float(top[..., 0] - top[..., 1])


@torch.inference_mode()
def run_policy(
    compact: CompactLlama, ids: list[int], exits: list[int], threshold: float, propagate: bool
) -> PolicyRun:
    layers = compact.num_layers
    result = PolicyRun(stops=dict.fromkeys([*exits, layers], 0))
    for chunk in scoring_windows(ids, WINDOW):
        cache = compact.new_cache(layers, 1, len(chunk))
        for t in range(len(chunk) - 1):
            token = torch.tensor([[chunk[t]]], device=compact.device)
            position = torch.tensor([[t]], device=compact.device)
            hidden, done, stop, logits = compact.embed(token), 0, layers, None
            for k in exits:
                hidden = compact.run_layers(hidden, position, cache, done, k, t)
                done = k
                candidate = compact.logits(hidden[:, -1], k, exit_adapter=True)
                result.checks += 1
                if margin(candidate) >= threshold:
                    stop, logits = k, candidate
                    break
            if logits is None:
                hidden = compact.run_layers(hidden, position, cache, done, layers, t)
                logits = compact.logits(hidden[:, -1], layers)
            elif propagate:  # each skipped layer's keys and values from h_k, as its input
                for i in range(stop, layers):
                    compact.run_layers(hidden, position, cache, i, i + 1, t)
                result.filled += layers - stop
            else:  # the skipped layers run for real: their keys and values are full depth's
                compact.run_layers(hidden, position, cache, stop, layers, t)
            cache.length = t + 1
            target = torch.tensor([chunk[t + 1]], device=logits.device)
            result.nll += float(F.cross_entropy(logits.float(), target))
            result.tokens += 1
            result.stops[stop] += 1
    return result


@torch.inference_mode()
def step_costs(compact: CompactLlama, repeats: int = 200) -> dict[str, float]:
    """Milliseconds of one decode step's parts at a 128-token context: a layer, the LM head, a layer's
    fused QKV product."""
    layers = compact.num_layers
    cache = compact.new_cache(layers, 1, 256)
    position = torch.tensor([[128]], device=compact.device)
    hidden = compact.embed(torch.tensor([[1]], device=compact.device))
    normed = F.rms_norm(hidden, (hidden.shape[-1],), compact.layers[0].input_norm, compact.eps)

    def timed(fn) -> float:
        for _ in range(10):
            fn()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - start) * 1000 / repeats

    return {
        "layer": timed(lambda: compact.run_layers(hidden, position, cache, 0, layers, 128)) / layers,
        "head": timed(lambda: compact.logits(hidden[:, -1], layers)),
        "kv": timed(lambda: compact.layers[0].qkv(normed)),
    }


def estimated_ms(run: PolicyRun, layers: int, costs: dict[str, float]) -> float:
    """Per token: the layers run, one head per margin read (and at full depth), the skipped layers' K/V."""
    heads = (run.checks + run.stops[layers]) / run.tokens
    filled = run.filled / run.tokens
    return run.mean_layers * costs["layer"] + heads * costs["head"] + filled * costs["kv"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, required=True, help="a directory with exit adapters")
    parser.add_argument("--base", type=Path, help="the model, when --model holds adapters alone")
    parser.add_argument("--text", default="dpkg-spec", help="a held-out text (workers/eval/heldout.py)")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--exits", default="15,21,24,27")
    parser.add_argument("--thresholds", default="0.9,0.7,0.5,0.3")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.base or args.model)
    layers = num_layers(model)
    adapters = load_adapters(args.model, layers, model.config.hidden_size)
    if adapters is None:
        raise SystemExit(f"{args.model} has no exit adapters")
    exits = sorted({int(k) for k in args.exits.split(",")})
    if not exits or exits[0] < 1 or exits[-1] >= layers or not all(adapters.has(k) for k in exits):
        raise SystemExit(f"--exits must be exits below {layers} that have adapters")
    compact = CompactLlama(model, "float32", adapters)
    ids = tokenizer.encode(heldout_texts()[args.text].text)[: args.tokens]
    costs = step_costs(compact)
    start = time.perf_counter()
    grid = [*exits, layers]
    fixed = measure_quality(compact, ids, grid, WINDOW)
    full = fixed[layers].perplexity
    print(
        f"text {args.text}: {fixed[layers].tokens} tokens scored, full-depth ppl {full:.2f}; ms of a decode "
        f"step's parts: layer {costs['layer']:.3f}, LM head {costs['head']:.3f}, QKV {costs['kv']:.3f}\n"
    )
    stops = " / ".join(map(str, grid))
    print(f"| policy | ppl ratio | mean layers | share stopping at {stops} | est. ms/token |")
    print("|---|---:|---:|---|---:|")
    for k in grid:
        ratio = (fixed[k].adapter_perplexity or fixed[k].perplexity) / full
        print(f"| fixed exit {k} | {ratio:.2f}x | {k} | | {k * costs['layer'] + costs['head']:.2f} |")
    summary = []
    for threshold in (float(x) for x in args.thresholds.split(",")):
        for propagate in (True, False):
            run = run_policy(compact, ids, exits, threshold, propagate)
            ratio = math.exp(run.nll / run.tokens) / full
            mean = run.mean_layers
            shares = " / ".join(f"{run.stops[k] / run.tokens:.2f}" for k in grid)
            ms = f"{estimated_ms(run, layers, costs):.2f}" if propagate else "n/a"
            kind = "propagated" if propagate else "full-KV"
            print(
                f"| margin >= {threshold:g}, {kind} | {ratio:.2f}x | {mean:.1f} | {shares} | {ms} |",
                flush=True,
            )
            if propagate:
                summary.append(f"{threshold:g}: {ratio:.2f}x at {mean:.1f} layers, {ms} ms")
    full_ms = layers * costs["layer"] + costs["head"]
    print(
        f"\nconfidence_exits ({args.text}): full depth {full_ms:.2f} ms/token; "
        + "; ".join(summary)
        + f"; {time.perf_counter() - start:.0f} s"
    )


if __name__ == "__main__":
    main()
