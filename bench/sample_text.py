"""Fitting text in the default model's own words, without a chat template: samples at full depth.

    python -m bench.sample_text --model DIR --out samples.jsonl [--tokens 32768] [--openers topics]

Each record is {"prompt": opener, "response": sample}: the model continues a short opener picked with a
seeded generator at temperature 1.0, top-p 0.95, up to 256 new tokens, in batches of 8 (`--batch`), float32
(`--precision`), seeds 0, 1, 2, ...; samples under 32 tokens are dropped. Openers: `words` ("The", "In",
"If you", ...: general text), or `topics`, a heading or first line about one of the 50 everyday topics of
`bench/sft_prompts.py` ("Baking bread at home", ...: everyday prose). `fit_exits` (and `sort`) take the file
as `"data"`. Adapters fitted on such text suit general prose (docs/exit-adapters.md: better on the held-out
prose, worse on chat answers than the bundled chat text). Prints one summary line.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from bench.sft_prompts import TOPICS
from workers.generation.engine import GenerationRequest
from workers.inference.worker import load_engine

OPENERS = (
    "The", "In", "When", "A", "It was", "Many people", "One of the", "On", "There", "After",
    "Scientists", "The history of", "If you", "This", "Our", "Every", "Last", "Some", "Most", "We",
)  # fmt: skip
TOPIC_OPENERS = (
    "{Topic}\n\n", "A few words on {topic}.\n\n", "Notes on {topic}\n\n", "{Topic} is",
    "I have been thinking about {topic}.", "Everyone has an opinion about {topic}.",
)  # fmt: skip
BATCH = 8


def openers(kind: str) -> list[str]:
    """Every opener of a kind: `words`, or `topics` (each topic opener template x each topic)."""
    if kind == "words":
        return list(OPENERS)
    return [
        template.format(topic=topic, Topic=topic[0].upper() + topic[1:])
        for template in TOPIC_OPENERS
        for topic in TOPICS
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tokens", type=int, default=32_768, help="stop once this many are written")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--batch", type=int, default=BATCH, help="requests decoded together")
    parser.add_argument("--openers", choices=("words", "topics"), default="words")
    parser.add_argument("--precision", default="float32", help="the engine's weight precision")
    args = parser.parse_args()
    started = time.perf_counter()
    engine = load_engine(args.model, precision=args.precision)
    choices = openers(args.openers)
    rng = random.Random(0)
    total = batches = records = 0
    with args.out.open("w", encoding="utf-8") as out:
        while total < args.tokens:
            chosen = [rng.choice(choices) for _ in range(args.batch)]
            requests = [
                GenerationRequest(
                    prompt_ids=engine.tokenizer.encode(opener, add_special_tokens=False),
                    depth=engine.num_layers,
                    max_new_tokens=args.max_new_tokens,
                    temperature=1.0,
                    top_p=0.95,
                    seed=batches * args.batch + i,
                )
                for i, opener in enumerate(chosen)
            ]
            for opener, result in zip(chosen, engine.run(requests), strict=True):
                if len(result.token_ids) >= 32:
                    out.write(json.dumps({"prompt": opener, "response": result.text}) + "\n")
                    total += len(result.token_ids)
                    records += 1
            batches += 1
    print(f"samples: {records} records, {total} tokens, {time.perf_counter() - started:.0f} s -> {args.out}")


if __name__ == "__main__":
    main()
