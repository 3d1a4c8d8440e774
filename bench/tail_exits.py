"""Exits through the model's own last layers: at a compute budget of B layers, run layers 1..k, map h_k
affinely onto h_(L-m) (the identity-centred ridge of `fit_exits`), then run the last m layers and the
shared final norm and head (k + m = B). m = 0 is the plain affine exit at B. Does handing the last layers
the work that copying needs move the out-of-domain text, where an affine exit at 50-70 % cannot?

    python -m bench.tail_exits --model MODEL_DIR [--fit-tokens 32768] [--tokens 2048]
                               [--budgets 15,21,24] [--tails 0,1,2,3,4] [--texts dpkg-spec,heldout]

The maps are fitted on the first --fit-tokens of the default bundled fitting text ("broad+prose+chat") in
256-token windows. Each exit's scale (inverse temperature) is the best of a grid chosen on the scored text
itself, so every ratio is a lower bound of what a fitted scale gives; no exit of any kind gets an advantage
from that. Perplexity ratios to full depth, 256-token windows overlapping by one as `measure_quality`,
float32 transformers layers (teacher-forced: every position takes the same path, so one pass is exact).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers.masking_utils import create_causal_mask

from workers.early_exit.adapters import Affine
from workers.early_exit.fit import RidgeAccumulator
from workers.early_exit.fit_data import DEFAULT_TEXT, bundled_records, fitting_ids
from workers.early_exit.forward import decoder_stack, residual_at_exits
from workers.eval.heldout import heldout_texts
from workers.generation.profiler import scoring_windows
from workers.jobs.models import load_model

WINDOW = 256
SCALES = (0.6, 0.8, 1.0, 1.2, 1.4, 1.7, 2.0, 2.5, 3.0)


class Layers:
    """The model's decoder layers, run on any hidden states over one window (no cache)."""

    def __init__(self, model) -> None:
        self.model, self.inner = model, decoder_stack(model)
        self.count = len(self.inner.layers)

    def context(self, ids: torch.Tensor) -> tuple:
        """(positions, causal mask, RoPE) of one window, what `run` attends with."""
        hidden = self.inner.embed_tokens(ids)
        positions = torch.arange(ids.shape[1])[None]
        mask = create_causal_mask(
            config=self.inner.config,
            inputs_embeds=hidden,
            attention_mask=None,
            past_key_values=None,
            position_ids=positions,
        )
        return positions, mask, self.inner.rotary_emb(hidden, position_ids=positions)

    def run(self, hidden: torch.Tensor, context: tuple, start: int, stop: int) -> torch.Tensor:
        positions, mask, rope = context
        for layer in self.inner.layers[start:stop]:
            hidden = layer(
                hidden, attention_mask=mask, position_embeddings=rope, position_ids=positions, use_cache=False
            )
        return hidden

    def states(self, ids: torch.Tensor) -> list[torch.Tensor]:
        """h_0..h_L of one window."""
        states = residual_at_exits(self.model, ids, range(self.count + 1))
        return [states[i] for i in range(self.count + 1)]

    def nll(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Summed next-token NLL of the window at each scale of SCALES."""
        logits = self.model.lm_head(self.inner.norm(hidden))[0, :-1]
        return torch.stack([F.cross_entropy(logits * s, targets, reduction="sum") for s in SCALES])


@torch.inference_mode()
def fit_maps(layers: Layers, ids: list[int], pairs: set[tuple[int, int]]) -> dict[tuple[int, int], Affine]:
    hidden_size = layers.inner.config.hidden_size
    sums = {pair: RidgeAccumulator(hidden_size) for pair in pairs}
    for i in range(0, len(ids) - WINDOW + 1, WINDOW):
        states = layers.states(torch.tensor(ids[i : i + WINDOW])[None])
        for (source, target), acc in sums.items():
            acc.add(states[source][0, 1:], states[target][0, 1:])  # position 0 (the sink) left out
    return {pair: acc.solve(1e-4)[0] for pair, acc in sums.items()}


@torch.inference_mode()
def ratios(
    layers: Layers, ids: list[int], maps: dict, budgets: list[int], tails: list[int]
) -> tuple[dict[tuple[int, int], float], float, int]:
    """(budget, tail) -> perplexity ratio to full depth (best scale of the grid); full ppl; tokens."""
    top = layers.count
    totals = {(b, m): torch.zeros(len(SCALES)) for b in budgets for m in tails}
    full, count = torch.zeros(len(SCALES)), 0
    for chunk in scoring_windows(ids, WINDOW):
        window = torch.tensor(chunk)[None]
        states, context = layers.states(window), layers.context(window)
        targets = window[0, 1:]
        full += layers.nll(states[top], targets)
        for b in budgets:
            for m in tails:
                mapped = maps[(b - m, top - m)](states[b - m])
                totals[(b, m)] += layers.nll(layers.run(mapped, context, top - m, top), targets)
        count += len(chunk) - 1
    base = float(full[SCALES.index(1.0)]) / count
    out = {key: float(torch.tensor(float(v.min()) / count - base).exp()) for key, v in totals.items()}
    return out, float(torch.tensor(base).exp()), count


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--fit-tokens", type=int, default=32768)
    parser.add_argument("--tokens", type=int, default=2048, help="scored tokens of each text at most")
    parser.add_argument("--budgets", default="15,21,24")
    parser.add_argument("--tails", default="0,1,2,3,4")
    parser.add_argument("--texts", default="dpkg-spec,heldout")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    layers = Layers(model.eval())
    budgets = [int(x) for x in args.budgets.split(",")]
    tails = [int(x) for x in args.tails.split(",")]
    if any(not 0 <= m < b <= layers.count for b in budgets for m in tails):
        raise SystemExit(f"every tail must be below every budget, budgets at most {layers.count}")
    start = time.perf_counter()
    fit_ids = fitting_ids(tokenizer, bundled_records(DEFAULT_TEXT), args.fit_tokens)
    maps = fit_maps(layers, fit_ids, {(b - m, layers.count - m) for b in budgets for m in tails})
    print(f"fitted {len(maps)} maps on {len(fit_ids)} tokens in {time.perf_counter() - start:.0f} s")
    texts = heldout_texts()
    best: dict[str, str] = {}
    for name in args.texts.split(","):
        ids = tokenizer.encode(texts[name].text)[: args.tokens]
        table, full, count = ratios(layers, ids, maps, budgets, tails)
        print(f"\n## {name} ({count} tokens scored, full-depth ppl {full:.2f})\n")
        print("| budget (layers) | " + " | ".join(f"tail {m}" for m in tails) + " |")
        print("|---|" + "---:|" * len(tails))
        for b in budgets:
            print(f"| {b} | " + " | ".join(f"{table[(b, m)]:.2f}x" for m in tails) + " |", flush=True)
        best[name] = ", ".join(
            f"{b}: tail {min(tails, key=lambda m: table[(b, m)])} "
            f"{min(table[(b, m)] for m in tails):.2f}x vs {table[(b, 0)]:.2f}x"
            for b in budgets
        )
    print("\ntail_exits: " + "; ".join(f"{n} {v}" for n, v in best.items()))


if __name__ == "__main__":
    main()
