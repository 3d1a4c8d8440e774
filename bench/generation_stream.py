"""A generation stream to run beside another benchmark: an inference worker's load without the service.

    python bench/generation_stream.py MODEL_DIR [--precision int8] [--depth N]

Loads the model into the engine (the worker's default precision) and decodes 64-token greedy answers back
to back until terminated, printing the running decode rate after each answer. Thread budget: whatever the
environment says (bench/merge_vs_mergekit.py --beside-generation gives it an inference worker's).
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from workers.generation.engine import GenerationRequest  # noqa: E402
from workers.inference.worker import load_engine  # noqa: E402
from workers.threads import apply_budget  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--depth", type=int)
    args = parser.parse_args()
    threads = apply_budget()
    engine = load_engine(args.model, precision=args.precision)
    depth = args.depth or engine.num_layers
    prompt = engine.tokenizer.encode("Tell me about the history of bread, in detail.")
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    tokens, started = 0, time.perf_counter()
    while not stopping:
        request = GenerationRequest(prompt_ids=prompt, depth=depth, max_new_tokens=64, ignore_eos=True)
        tokens += len(engine.run([request])[0].token_ids)
        rate = tokens / (time.perf_counter() - started)
        print(f"{engine.precision} depth {depth}, {threads} thread(s): {rate:.1f} tok/s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
