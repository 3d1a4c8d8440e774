"""Exit adapters on a model (default: SmolLM2-135M-Instruct): fit them, score every exit on held-out text.

    python -m bench.exit_adapters --model DIR --out OUT [--distill-exits 15,21,24,27 --distill-steps 120]

1. the default `fit_exits` fit (closed-form ridge, every exit below L, the bundled fitting text), timed;
2. optionally KL distillation on top for a few exits (from the same pass: the cached hidden states);
3. held-out perplexity and top-1 agreement with full depth (workers/data/heldout.txt, never fitted on) per
   exit: plain, with the ridge adapter, with the distilled adapter; ratios to full depth;
4. greedy samples per exit for a few chat prompts (uncached reference forward, with the adapters).
Prints a table and one summary line; everything goes to OUT/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import get_args

import torch

from workers.device import default_device, describe_device
from workers.early_exit.adapters import ExitAdapters
from workers.early_exit.fit import FitConfig, default_fit_exits, fit_exit_adapters, fit_pointers
from workers.early_exit.fit_data import (
    DEFAULT_MAX_TOKENS,
    DEFAULT_TEXT,
    BundledText,
    bundled_paths,
    bundled_records,
    fitting_windows,
)
from workers.early_exit.forward import exit_logits, num_layers
from workers.generation.profiler import HELDOUT_PATH, measure_quality
from workers.jobs.models import load_model
from workers.train.data import read_jsonl

PROMPTS = ["What is the capital of Japan?", "Give me two tips for sleeping better."]
START = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - START:7.1f}s] {message}", flush=True)


@torch.inference_mode()
def greedy(model, tokenizer, prompt: str, depth: int, adapters, new_tokens: int) -> str:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
    )
    ids = tokenizer.encode(text, add_special_tokens=False)
    out: list[int] = []
    for _ in range(new_tokens):
        logits = exit_logits(model, torch.tensor([ids + out]), depth, adapters=adapters)
        token = int(logits[0, -1].argmax())
        if token == tokenizer.eos_token_id:
            break
        out.append(token)
    return tokenizer.decode(out)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS)
    parser.add_argument(
        "--data", type=Path, nargs="*", default=[], help="more JSONL records, after the bundled"
    )
    parser.add_argument("--bundled", choices=get_args(BundledText), default=DEFAULT_TEXT)
    parser.add_argument("--no-bundled", action="store_true", help="fit on --data alone")
    parser.add_argument(
        "--user-weight",
        type=float,
        default=None,
        help="fit_exits' mix_bundled: --data as its own text (up to --max-tokens) weighted this much against "
        "the bundled text's tokens (default: --data after the bundled records, in one stream)",
    )
    parser.add_argument("--no-scale", action="store_true", help="leave every exit's scale at 1")
    parser.add_argument("--distill-tokens", type=int, default=8192)
    parser.add_argument("--ridge", type=float, default=1e-4)
    parser.add_argument("--no-pointer", action="store_true", help="fit no exit pointers")
    parser.add_argument("--pointer-tokens", type=int, default=FitConfig.pointer_tokens)
    parser.add_argument("--fit-on", choices=("all", "responses"), default="all")
    parser.add_argument("--distill-exits", default="")
    parser.add_argument("--distill-steps", type=int, default=0)
    parser.add_argument("--distill-batch-tokens", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--sample-exits", default="")
    parser.add_argument("--sample-tokens", type=int, default=16)
    parser.add_argument("--heldout-tokens", type=int, default=2048)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {"argv": vars(args) | {"model": str(args.model), "out": str(args.out)}}
    results["machine"] = {"device": describe_device(), "load_before": os.getloadavg()}

    def save() -> None:
        (args.out / "results.json").write_text(json.dumps(results, indent=1, default=str))

    model, tokenizer = load_model(args.model)
    model.to(default_device())  # CUDA when there is one, like the fit_exits job
    layers = num_layers(model)
    extra = [record for path in args.data for record in read_jsonl(path)]
    bundled = [] if args.no_bundled else bundled_records(args.bundled)
    texts = [(bundled + extra, 1.0)]
    if args.user_weight is not None:  # as fit_exits' mix_bundled: the user's text, then the bundled
        texts = [(extra, args.user_weight), (bundled, 1.0)]
    fitting = fitting_windows(tokenizer, texts, args.max_tokens, 256, args.fit_on == "responses")
    results["data"] = {
        "files": ([] if args.no_bundled else [p.name for p in bundled_paths(args.bundled)])
        + [str(p) for p in args.data],
        "tokens": sum(fitting.tokens),
        "tokens_per_text": fitting.tokens,
        "user_weight": args.user_weight,
        "fit_on": args.fit_on,
    }
    log(f"fitting text: {fitting.tokens} tokens from {results['data']['files']}")
    distill_exits = tuple(int(k) for k in args.distill_exits.split(",") if k)
    config = FitConfig(
        ridge=args.ridge,
        distill_steps=args.distill_steps if distill_exits else 0,
        lr=args.lr,
        distill_batch_tokens=args.distill_batch_tokens,
        distill_tokens=args.distill_tokens,
        distill_exits=distill_exits or None,
        fit_scale=not args.no_scale,
        pointer=not args.no_pointer,
        pointer_tokens=args.pointer_tokens,
    )
    last = [0.0]

    def progress(message: str, fraction: float) -> None:
        if time.perf_counter() - last[0] > 30:
            last[0] = time.perf_counter()
            log(f"{fraction:.0%} {message}")

    started = time.perf_counter()
    fitted = fit_exit_adapters(
        model,
        fitting.windows,
        default_fit_exits(layers),
        config,
        progress,
        fitting.masks,
        fitting.weights,
    )
    results["fit"] = fitted.report.as_dict() | {"seconds_total": round(time.perf_counter() - started, 1)}
    results["machine"]["load_after_fit"] = os.getloadavg()
    log(f"fitted in {results['fit']['seconds_total']} s: {results['fit']['seconds']}")
    fitted.adapters.save(args.out, {"bench": "exit_adapters"})
    if config.distill_steps:  # the default fit (ridge + scale) of the same pass, beside the distilled one
        (args.out / "ridge").mkdir(exist_ok=True)
        if config.pointer:  # the undistilled exits as the default fit_exits stores them: with pointers
            fitted = replace(
                fitted, ridge=fit_pointers(model, fitted.ridge, fitting.windows, config.pointer_tokens)
            )
        fitted.ridge.save(args.out / "ridge", {"bench": "exit_adapters", "stage": "ridge + scale"})
    save()

    heldout = tokenizer.encode(HELDOUT_PATH.read_text(encoding="utf-8"))[: args.heldout_tokens]
    grid = list(range(1, layers + 1))
    plain_ridge = measure_quality(model, heldout, grid, 256, adapters=fitted.ridge)
    unscaled_maps = {k: replace(a, scale=1.0) for k, a in fitted.ridge.maps.items()}
    unscaled = measure_quality(
        model, heldout, grid, 256, adapters=ExitAdapters(unscaled_maps, layers, fitted.ridge.hidden_size)
    )
    distilled = (
        measure_quality(model, heldout, list(distill_exits) + [layers], 256, adapters=fitted.adapters)
        if distill_exits and args.distill_steps
        else {}
    )
    full = plain_ridge[layers].perplexity
    rows = []
    for k in grid:
        q = plain_ridge[k]
        row = {
            "exit": k,
            "depth_pct": round(100 * k / layers),
            "plain_ppl": q.perplexity,
            "plain_ratio": q.perplexity / full,
            "plain_top1": q.top1_agreement,
            "ridge_ppl": q.adapter_perplexity,
            "ridge_ratio": q.adapter_perplexity / full if q.adapter_perplexity else None,
            "ridge_top1": q.adapter_top1_agreement,
            "ridge_scale": fitted.ridge.maps[k].scale if fitted.ridge.has(k) else None,
            "scale1_ratio": (unscaled[k].adapter_perplexity or 0) / full or None,
        }
        if k in distilled and k < layers:
            row |= {
                "distill_ppl": distilled[k].adapter_perplexity,
                "distill_ratio": distilled[k].adapter_perplexity / full,
                "distill_top1": distilled[k].adapter_top1_agreement,
                "distill_scale": fitted.adapters.maps[k].scale,
            }
        rows.append(row)
    results["quality"] = {"heldout_tokens": plain_ridge[layers].tokens, "full_ppl": full, "rows": rows}
    results["machine"]["load_after_quality"] = os.getloadavg()
    save()
    columns = ["plain ratio", "top-1", "adapter ratio", "top-1", "scale", "at scale 1", "+distill", "top-1"]
    print("| exit | depth | " + " | ".join(columns) + " |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        d = f"{r['distill_ratio']:.2f}x | {r['distill_top1']:.3f}" if "distill_ratio" in r else "- | -"
        a = "- | - | - | -"
        if r["ridge_ratio"]:
            a = f"{r['ridge_ratio']:.2f}x | {r['ridge_top1']:.3f} | {r['ridge_scale']:.3f} | "
            a += f"{r['scale1_ratio']:.2f}x"
        plain = f"{r['plain_ratio']:.3g}x | {r['plain_top1']:.3f}"
        print(f"| {r['exit']} | {r['depth_pct']}% | {plain} | {a} | {d} |")

    sample_exits = [int(k) for k in args.sample_exits.split(",") if k]
    samples = []
    for prompt in PROMPTS if sample_exits else []:
        for k in sample_exits:
            text = greedy(model, tokenizer, prompt, k, fitted.adapters, args.sample_tokens)
            plain = greedy(model, tokenizer, prompt, k, None, args.sample_tokens) if k < layers else None
            samples.append({"prompt": prompt, "exit": k, "adapter": text, "plain": plain})
            log(f"exit {k}: {text!r} (plain: {plain!r})")
            results["samples"] = samples
            save()
    results["machine"]["load_end"] = os.getloadavg()
    save()
    by_pct = {r["depth_pct"]: r for r in rows}
    summary = ", ".join(
        f"{p}%: {by_pct[p]['ridge_ratio']:.2f}x"
        + (f" (distilled {by_pct[p]['distill_ratio']:.2f}x)" if "distill_ratio" in by_pct[p] else "")
        for p in (90, 80, 70, 50)
        if p in by_pct and by_pct[p]["ridge_ratio"]
    )
    seconds, tokens = results["fit"]["seconds_total"], sum(fitting.tokens)
    print(f"exit adapters: fit {seconds} s on {tokens} tokens; ppl ratio {summary}")


if __name__ == "__main__":
    main()
