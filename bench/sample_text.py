"""Fitting text in the default model's own words, without a chat template: samples at full depth.

    python -m bench.sample_text --model DIR --out samples.jsonl [--tokens 32768]

Each record is {"prompt": opener, "response": sample}: the model continues a short opener ("The", "In",
"If you", ...; picked with a seeded generator) at temperature 1.0, top-p 0.95, up to 256 new tokens, in
batches of 8 (`--batch`), float32, seeds 0, 1, 2, ...; samples under 32 tokens are dropped. `fit_exits` (and
`sort`) take the file as `"data"`. Adapters fitted on it suit general text (docs/exit-adapters.md: better on
the held-out prose, worse on chat answers than the bundled chat text). Prints one summary line.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from workers.generation.engine import GenerationRequest
from workers.inference.worker import load_engine

OPENERS = (
    "The", "In", "When", "A", "It was", "Many people", "One of the", "On", "There", "After",
    "Scientists", "The history of", "If you", "This", "Our", "Every", "Last", "Some", "Most", "We",
)  # fmt: skip
BATCH = 8


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tokens", type=int, default=32_768, help="stop once this many are written")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--batch", type=int, default=BATCH, help="requests decoded together")
    args = parser.parse_args()
    started = time.perf_counter()
    engine = load_engine(args.model, precision="float32")
    rng = random.Random(0)
    total = batches = records = 0
    with args.out.open("w", encoding="utf-8") as out:
        while total < args.tokens:
            openers = [rng.choice(OPENERS) for _ in range(args.batch)]
            requests = [
                GenerationRequest(
                    prompt_ids=engine.tokenizer.encode(opener, add_special_tokens=False),
                    depth=engine.num_layers,
                    max_new_tokens=args.max_new_tokens,
                    temperature=1.0,
                    top_p=0.95,
                    seed=batches * args.batch + i,
                )
                for i, opener in enumerate(openers)
            ]
            for opener, result in zip(openers, engine.run(requests), strict=True):
                if len(result.token_ids) >= 32:
                    out.write(json.dumps({"prompt": opener, "response": result.text}) + "\n")
                    total += len(result.token_ids)
                    records += 1
            batches += 1
    print(f"samples: {records} records, {total} tokens, {time.perf_counter() - started:.0f} s -> {args.out}")


if __name__ == "__main__":
    main()
