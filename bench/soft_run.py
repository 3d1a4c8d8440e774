"""The Sorted Fine-Tuning experiment on the default model, end to end (CUDA when present, else CPU).

    python -m bench.soft_run --work /tmp/soft --out OUT [--stages data,before,train,samples,bench]

Stages (each reads what the earlier ones left in --work):
  data     convert the default model (workers.default_model) to WORK/base unless it is there; write
           OUT/sft.jsonl: the prompts of bench/sft_prompts.py answered by the model at full depth, greedy
           (the engine, batches of left-padded prompts), keeping answers that ended with EOS within
           --max-new-tokens (with --cut-unfinished, the others cut after their last sentence end).
  before   held-out perplexity and top-1 agreement (workers/data/heldout.txt) of the base's exits.
  train    Sorted Fine-Tuning (default exits, bf16 autocast) once per --configs entry, on WORK/sft.jsonl
           (else the shipped workers/data/sft.jsonl), then the same quality figures for each run (and
           every --eval-every steps); the run that best meets the target (exits >= L/2 within 3x of
           the full model's perplexity, full depth at most +15%) is saved to WORK/sorted.
  samples  greedy continuations of 3 prompts at several exits, before and after.
  bench    bench.speculative on the SoFT model (and on the base, for comparison).
Everything goes to OUT/results.json; progress to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

import torch

from bench.sft_prompts import sft_prompts
from bench.speculative import chat_ids
from workers.device import describe_device
from workers.early_exit.adapters import FILENAME as ADAPTERS_FILE
from workers.early_exit.adapters import ExitAdapters, load_adapters
from workers.generation.engine import EarlyExitEngine, GenerationRequest
from workers.generation.profiler import measure_quality
from workers.train.sorted_ft import SortConfig, default_exits, train_sorted

SAMPLE_PROMPTS = [
    "What is the capital of Japan?",
    "Give me two tips for sleeping better.",
    "Write one sentence about the ocean.",
]
DEFAULT_CONFIGS = [
    {"lr": 1e-4, "steps": 300, "batch_size": 16, "warmup_steps": 20},
    {"lr": 2e-4, "steps": 300, "batch_size": 16, "warmup_steps": 20},
]
START = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - START:7.1f}s] {message}", flush=True)


def load(model_dir: Path, device: torch.device):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    return model, tokenizer


SENTENCE_END = re.compile(r"[.!?](?=\s|$)")


def cut_at_sentence(text: str) -> str:
    """The text up to and including its last sentence end (., ! or ? before a space or the end), else ""."""
    ends = [match.end() for match in SENTENCE_END.finditer(text)]
    return text[: ends[-1]].rstrip() if ends else ""


def generate_answers(model, tokenizer, prompts, max_new_tokens: int, batch_size: int):
    """(answer text, ended with EOS) per prompt: greedy decoding at full depth with the engine, in batches
    of `batch_size` left-padded prompts (rows leave the batch as they finish)."""
    engine = EarlyExitEngine(model, tokenizer, device=model.device, max_batch_size=batch_size)
    layers = engine.num_layers
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        requests = [
            GenerationRequest(prompt_ids=chat_ids(tokenizer, p), depth=layers, max_new_tokens=max_new_tokens)
            for p in chunk
        ]
        for result in engine.run(requests):
            out.append((result.text.strip(), result.finish_reason == "eos"))
        log(f"  generated {len(out)}/{len(prompts)}")
    return out


def stage_data(args, device, results) -> None:
    base = args.work / "base"
    if not (base / "config.json").exists():
        from workers.default_model import convert_default_model

        convert_default_model(base)
        log("converted the default model")
    model, tokenizer = load(base, device)
    prompts = sft_prompts(args.n_prompts)
    answers = generate_answers(model, tokenizer, prompts, args.max_new_tokens, args.gen_batch)
    lines, dropped, cut = [], 0, 0
    for prompt, (answer, ended) in zip(prompts, answers, strict=True):
        if not ended and args.cut_unfinished:
            answer, cut = cut_at_sentence(answer), cut + 1
        if not answer or not (ended or args.cut_unfinished):
            dropped += 1
            continue
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        lines.append(json.dumps({"messages": messages}, ensure_ascii=False))
    text = ""
    for line in lines:
        if len((text + line + "\n").encode()) > args.max_data_bytes:
            break
        text += line + "\n"
    kept = text.count("\n")
    (args.work / "sft.jsonl").write_text(text, encoding="utf-8")
    (args.out / "sft.jsonl").write_text(text, encoding="utf-8")
    results["data"] = {
        "prompts": len(prompts),
        "kept": kept,
        "unfinished_cut_at_sentence_end": cut,
        "dropped": dropped,
        "max_new_tokens": args.max_new_tokens,
        "bytes": len(text.encode()),
    }
    log(f"sft.jsonl: {kept} kept ({cut} cut at a sentence end), {dropped} dropped, {len(text.encode())} B")


def heldout_ids(tokenizer) -> list[int]:
    from workers.eval.texts import heldout_text

    return tokenizer.encode(heldout_text(), add_special_tokens=False)


QUALITY_STEP = 3


def quality(model, tokenizer, adapters: ExitAdapters | None = None) -> dict:
    """Perplexity and top-1 agreement on the held-out text at every QUALITY_STEP-th exit and full depth
    (also through each exit's adapter, where `adapters` has one)."""
    layers = model.config.num_hidden_layers
    grid = sorted(set(range(QUALITY_STEP, layers + 1, QUALITY_STEP)) | set(default_exits(layers)) | {layers})
    measured = measure_quality(model, heldout_ids(tokenizer), grid, window=256, adapters=adapters)
    return {str(k): v.model_dump() for k, v in measured.items()}


def served_ppl(entry: dict) -> float:
    """The perplexity a request at this exit gets: through its adapter when it has one."""
    return entry.get("adapter_perplexity") or entry["perplexity"]


def stage_before(args, device, results) -> None:
    model, tokenizer = load(args.work / "base", device)
    results["before"] = quality(model, tokenizer)
    full = results["before"][str(model.config.num_hidden_layers)]["perplexity"]
    log(f"before: full-depth perplexity {full:.2f}")


def target(before: dict, after: dict, layers: int) -> dict:
    """Exits >= L/2 within 3x of the full model's perplexity (before and after SoFT; through the exit's
    adapter where it has one); full depth <= +15%."""
    full_before = before[str(layers)]["perplexity"]
    full_after = after[str(layers)]["perplexity"]
    upper = [k for k in default_exits(layers) if k >= layers / 2]
    ratio_before = max(served_ppl(after[str(k)]) / full_before for k in upper)
    ratio_after = max(served_ppl(after[str(k)]) / full_after for k in upper)
    rise = full_after / full_before - 1
    return {
        "exits_checked": upper,
        "worst_ratio_to_original_full": ratio_before,
        "worst_ratio_to_sorted_full": ratio_after,
        "full_depth_rise": rise,
        "met": ratio_before <= 3 and rise <= 0.15,
    }


def training_data(work: Path) -> Path:
    """WORK/sft.jsonl when the data stage wrote one, else the shipped workers/data/sft.jsonl."""
    from workers.train.data import shipped_data_path

    generated = work / "sft.jsonl"
    return generated if generated.exists() else shipped_data_path()


def stage_train(args, device, results) -> None:
    from workers.train.data import load_examples

    base = args.work / "base"
    runs = []
    best = None
    for index, overrides in enumerate(args.configs):
        model, tokenizer = load(base, device)
        examples = load_examples(training_data(args.work), tokenizer)
        config = SortConfig(seed=0, **overrides)
        every = max(1, (config.steps or 100) // 6)
        checkpoints: dict[str, dict] = {}

        def progress(
            step, total, losses, every=every, index=index, checkpoints=checkpoints, model=model, tok=tokenizer
        ):
            if step == 1 or step % every == 0 or step == total:
                shown = " ".join(f"{k}:{v:.2f}" for k, v in losses.items())
                log(f"  run {index} step {step}/{total} {shown}")
            if args.eval_every and step % args.eval_every == 0 and step < total:
                layers = model.config.num_hidden_layers
                verdict = target(results["before"], quality(model, tok), layers)
                checkpoints[str(step)] = verdict
                log(f"  run {index} step {step}: {verdict}")

        log(f"run {index}: {config.model_dump(exclude_none=True)}")
        report = train_sorted(model, tokenizer, examples, config, progress=progress, device=device)
        after = quality(model, tokenizer, report.adapters)
        verdict = target(results["before"], after, model.config.num_hidden_layers)
        run = {
            "config": overrides,
            "report": report.model_dump(mode="json"),
            "after": after,
            "target": verdict,
            "checkpoints": checkpoints,
        }
        runs.append(run)
        log(f"run {index}: {report.seconds:.1f}s, target {verdict}")
        score = (
            not verdict["met"],
            verdict["full_depth_rise"] > 0.15,
            verdict["worst_ratio_to_original_full"],
        )
        if best is None or score < best[0]:
            best = (score, index)
            model.to("cpu").save_pretrained(args.work / "sorted")
            tokenizer.save_pretrained(args.work / "sorted")
            (args.work / "sorted" / ADAPTERS_FILE).unlink(missing_ok=True)
            if report.adapters is not None:
                report.adapters.save(args.work / "sorted", {"bench": "soft_run", "run": index})
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    results["runs"] = runs
    results["best_run"] = best[1]
    results["after"] = runs[best[1]]["after"]
    log(f"best run: {best[1]}")


def samples(model_dir: Path, device, depths: list[int], max_new: int) -> dict:
    """Greedy answers per exit (through the exit adapters stored with the model, if any)."""
    model, tokenizer = load(model_dir, device)
    adapters = load_adapters(model_dir, model.config.num_hidden_layers, model.config.hidden_size)
    engine = EarlyExitEngine(model, tokenizer, device=device, max_batch_size=64, adapters=adapters)
    prompts = [chat_ids(tokenizer, p) for p in SAMPLE_PROMPTS]
    requests = [
        GenerationRequest(prompt_ids=list(ids), depth=d, max_new_tokens=max_new)
        for d in depths
        for ids in prompts
    ]
    finished = engine.run(requests)
    out: dict = {p: {} for p in SAMPLE_PROMPTS}
    for request, result in zip(requests, finished, strict=True):
        out[SAMPLE_PROMPTS[prompts.index(list(request.prompt_ids))]][str(request.depth)] = result.text
    return out


def stage_samples(args, device, results) -> None:
    layers = json.loads((args.work / "base" / "config.json").read_text())["num_hidden_layers"]
    depths = sorted({6, 9} | set(default_exits(layers)))
    results["samples"] = {
        "depths": depths,
        "before": samples(args.work / "base", device, depths, args.sample_tokens),
        "after": samples(args.work / "sorted", device, depths, args.sample_tokens),
    }
    log("samples done")


def stage_bench(args, device, results) -> None:
    from bench.speculative import render, run_bench

    results.setdefault("bench", {})
    for name in args.bench_models.split(","):
        report = run_bench(
            args.work / name,
            args.draft_depths,
            args.num_draft,
            args.bench_tokens,
            device=str(device),
            num_prompts=args.bench_prompts,
        )
        report["model"] = name
        results["bench"][name] = report
        print(render(report), flush=True)
        log(f"bench {name} done")


STAGES = {
    "data": stage_data,
    "before": stage_before,
    "train": stage_train,
    "samples": stage_samples,
    "bench": stage_bench,
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--stages", default="data,before,train,samples,bench")
    parser.add_argument("--n-prompts", type=int, default=900)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--gen-batch", type=int, default=128)
    parser.add_argument(
        "--cut-unfinished",
        action="store_true",
        help="keep answers that hit --max-new-tokens, cut after their last sentence end (else drop them)",
    )
    parser.add_argument("--max-data-bytes", type=int, default=1_400_000)
    parser.add_argument("--configs", type=json.loads, default=DEFAULT_CONFIGS)
    parser.add_argument(
        "--eval-every", type=int, default=0, help="also score the exits every N training steps (0: never)"
    )
    parser.add_argument("--sample-tokens", type=int, default=40)
    parser.add_argument(
        "--draft-depths", type=lambda s: [int(x) for x in s.split(",")], default=[8, 12, 15, 18]
    )
    parser.add_argument("--num-draft", type=lambda s: [int(x) for x in s.split(",")], default=[3, 5])
    parser.add_argument("--bench-tokens", type=int, default=128)
    parser.add_argument("--bench-prompts", type=int, default=8)
    parser.add_argument("--bench-models", default="sorted,base", help="folders of WORK to benchmark")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results_path = args.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    saved = args.work / "results.json"
    if not results and saved.exists():
        results = json.loads(saved.read_text())
    results["device"] = describe_device(device)
    results["torch"] = torch.__version__
    import transformers

    results["transformers"] = transformers.__version__
    for name in args.stages.split(","):
        log(f"stage {name}")
        STAGES[name](args, device, results)
        for path in (results_path, saved):
            path.write_text(json.dumps(results, indent=2))
    log("all done")


if __name__ == "__main__":
    main(sys.argv[1:])
