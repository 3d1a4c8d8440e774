"""More fitting text for exit adapters: the default model's own answers, at full depth, to prompts that
workers/data/sft.jsonl does not use.

    python -m bench.fit_answers --model DIR --out workers/data/answers.jsonl --count 96 [--skip 330]

Prompts: bench/sft_prompts.py's seeded pool (written for this project), from position --skip on (the first
330 were used for sft.jsonl). Answers: greedy decoding at full depth with the engine (the model's chat
template, batches of left-padded prompts), capped at --max-new-tokens; unfinished answers are cut after
their last sentence end, answers without one are dropped. Each line is a {"messages": [user, assistant]}
record, the form `fit_exits` and `sort` read. Prints one summary line.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench.sft_prompts import sft_prompts
from bench.soft_run import cut_at_sentence, generate_answers, load
from workers.device import default_device


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--count", type=int, default=96)
    parser.add_argument("--skip", type=int, default=330)
    parser.add_argument("--max-new-tokens", type=int, default=80)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    started = time.perf_counter()
    model, tokenizer = load(args.model, default_device())
    prompts = sft_prompts(args.skip + args.count)[args.skip :]
    lines, cut, dropped = [], 0, 0
    for prompt, (answer, ended) in zip(
        prompts, generate_answers(model, tokenizer, prompts, args.max_new_tokens, args.batch), strict=True
    ):
        if not ended:
            answer, cut = cut_at_sentence(answer), cut + 1
        if not answer:
            dropped += 1
            continue
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        lines.append(json.dumps({"messages": messages}, ensure_ascii=False))
    args.out.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    seconds = time.perf_counter() - started
    print(
        f"fit answers: {len(lines)} kept of {len(prompts)} ({cut} cut at a sentence end, {dropped} dropped), "
        f"{args.out.stat().st_size} B in {seconds:.0f} s"
    )


if __name__ == "__main__":
    main()
