"""vLLM's decoding speed on a CUDA GPU for bench/gpu_checks.sh's parity step: batch 1 and `--batch` rows.

    python bench/vllm_decode.py --model DIR [--batch 8] [--new-tokens 128] [--prompt-tokens 200]

Greedy, bfloat16, EOS ignored. Decode tok/s over all rows = rows * (new_tokens - 1) / (t(new_tokens) - t(1)),
two `generate` calls on the same prompts (the second minus the first is decoding); medians of `--rounds`.
Prints one line per row count: `vllm: rows=<n> decode_tok_s=<x>`. Exits 0 with a line saying so where vLLM is
not installed or there is no CUDA GPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    try:
        import torch
        from vllm import LLM, SamplingParams
    except ImportError as e:
        print(f"vllm: skipped ({e.name} is not installed)")
        return 0
    if not torch.cuda.is_available():
        print("vllm: skipped (no CUDA GPU)")
        return 0
    llm = LLM(model=str(args.model), dtype="bfloat16", enforce_eager=False, gpu_memory_utilization=0.5)
    generator = torch.Generator().manual_seed(0)
    vocab = llm.get_tokenizer().vocab_size

    def timed(prompts: list[list[int]], tokens: int) -> float:
        params = SamplingParams(temperature=0.0, max_tokens=tokens, min_tokens=tokens, ignore_eos=True)
        start = time.perf_counter()
        llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return time.perf_counter() - start

    for rows in (1, args.batch):
        prompts = [
            torch.randint(3, vocab, (args.prompt_tokens,), generator=generator).tolist() for _ in range(rows)
        ]
        timed(prompts, 4)  # warm-up
        rates = []
        for _ in range(args.rounds):
            one, full = timed(prompts, 1), timed(prompts, args.new_tokens)
            rates.append(rows * (args.new_tokens - 1) / max(1e-9, full - one))
        print(f"vllm: rows={rows} decode_tok_s={statistics.median(rates):.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
