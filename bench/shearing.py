"""LLM-Shearing on this machine: learned masks vs activation scores, each healed with the same token budget,
with and without dynamic batch loading, plus a same-shape baseline (the source's first layers, channels and
groups) trained for the same tokens. Per-domain and overall held-out perplexity, steps and seconds.

    python -m bench.shearing                  # the default model (SmolLM2-135M), 15 % and 50 % removed
    python -m bench.shearing --quick          # a tiny random model, seconds (the suite runs this)

Every arm heals by distillation from the source (workers.prune.heal) for --heal-steps windows of --seq-len
tokens; the learned arm's mask phase trains --mask-steps more windows first (the same fixed domain mix), and
the baseline trains --mask-steps + --heal-steps windows, so it sees as many tokens as the learned arm.
Held out: the last --heldout-windows windows of each domain (test) are never trained on; the
--heldout-windows before them (dev) set the DBL weights and the reference losses (the source's).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from workers.prune.heal import heal
from workers.prune.prune import prune
from workers.prune.shear import MaskOptions, Shape, extract, first_components, learn_masks
from workers.prune.target import PruneTarget, plan
from workers.train.domains import DEFAULT_DOMAINS, load_domains
from workers.train.dynamic_batches import ETA, DomainSampler, domain_losses, dynamic_loading


def model_dir(quick: bool, work: Path) -> Path:
    if quick:
        from tests.tiny_models import make_tiny_chat_llama

        path = work / "tiny"
        if not (path / "config.json").exists():
            make_tiny_chat_llama(path, seed=0)
        return path
    from workers.default_model import convert_default_model

    path = work / "smollm2-135m-instruct"
    if not (path / "config.json").exists():
        convert_default_model(path)
    return path


def spread(gaps: dict[str, float]) -> float:
    """max - min of the per-domain loss gaps to reference."""
    return max(gaps.values()) - min(gaps.values())


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny random model, a few steps")
    p.add_argument("--fractions", default="0.15,0.5", help="parameter fractions to remove")
    p.add_argument("--mask-steps", type=int, default=60)
    p.add_argument("--heal-steps", type=int, default=60)
    p.add_argument("--heal-lr", type=float, default=1e-4)
    p.add_argument(
        "--eta",
        default=f"{ETA:g}",
        help="DBL's step size (the paper's: 1); a comma list runs a DBL arm per value, the first named *_dbl",
    )
    p.add_argument("--update-every", type=int, default=10, help="DBL weight update period (steps)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--heldout-windows", type=int, default=6)
    p.add_argument("--max-tokens", type=int, default=16_384, help="per domain")
    p.add_argument(
        "--work", default=os.environ.get("STRATA_BENCH_WORK", str(Path(tempfile.gettempdir()) / "shear"))
    )
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    p.add_argument("--mask-lr", type=float, default=MaskOptions().mask_lr)
    p.add_argument("--multiplier-lr", type=float, default=MaskOptions().multiplier_lr)
    p.add_argument(
        "--model-lr", type=float, default=MaskOptions().model_lr, help="weights' mask-phase lr (0: frozen)"
    )
    p.add_argument("--learned-only", action="store_true", help="only the learned arms (a mask-phase variant)")
    p.add_argument("--device", default="cpu", help="where the mask phase and healing train (cuda on a GPU)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.mask_steps, args.heal_steps, args.update_every = 4, 4, 2
        args.seq_len, args.heldout_windows, args.max_tokens = 16, 1, 400
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    path = model_dir(args.quick, work)
    source = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    domains = load_domains(
        tokenizer, dict.fromkeys(DEFAULT_DOMAINS), args.seq_len, args.heldout_windows, args.max_tokens
    )
    names = [d.name for d in domains]
    test = {d.name: d.test for d in domains}
    test_tokens = {d.name: sum(len(w) - 1 for w in d.test) for d in domains}
    source_test = domain_losses(source, test)
    source_dev = domain_losses(source, {d.name: d.dev for d in domains})  # the DBL reference losses
    calibration = [w.view(1, -1) for d in domains for w in d.train[:2]]
    gap_batches = [w.view(1, -1) for d in domains for w in d.dev[:2]]

    def measure(model) -> dict:
        losses = domain_losses(model, test)
        overall = sum(losses[n] * test_tokens[n] for n in names) / sum(test_tokens.values())
        gaps = {n: losses[n] - source_test[n] for n in names}
        return {
            "ppl": {n: round(math.exp(v), 3) for n, v in losses.items()},
            "overall_ppl": round(math.exp(overall), 3),
            "gap": {n: round(v, 4) for n, v in gaps.items()},
            "gap_spread": round(spread(gaps), 4),
        }

    source_overall = sum(source_test[n] * test_tokens[n] for n in names) / sum(test_tokens.values())
    results: dict = {
        "source": {
            "ppl": {n: round(math.exp(v), 3) for n, v in source_test.items()},
            "overall_ppl": round(math.exp(source_overall), 3),
        },
        "params": source.num_parameters(),
        "args": vars(args),
        "runs": {},
    }
    print(f"source: overall ppl {results['source']['overall_ppl']}  {results['source']['ppl']}", flush=True)

    def fixed_stream(seed: int):
        return DomainSampler(domains, [1.0] * len(domains), batch_size=1, seed=seed)

    etas = [float(e) for e in args.eta.split(",")]
    # DBL arms: (name suffix, eta); the first eta's arms are "*_dbl", the others "*_dbl_eta<value>"
    dbl_arms = [("dbl" if i == 0 else f"dbl_eta{eta:g}", eta) for i, eta in enumerate(etas)]

    def healed(name: str, model, steps: int, eta: float | None, extra: dict) -> dict:
        dbl = eta is not None
        loading = dynamic_loading(
            model, source_dev, domains, None, 1, args.update_every if dbl else None, seed=1, eta=eta or ETA
        )
        start = time.perf_counter()
        report = heal(
            model, source, gap_batches, steps=steps, lr=args.heal_lr, device=args.device, loading=loading
        )
        row = {
            **extra,
            **measure(model),
            "heal_steps": steps,
            "heal_seconds": round(time.perf_counter() - start, 1),
            "params": model.num_parameters(),
            "kd_before": round(report.kd_before, 4),
            "kd_after": round(report.kd_after, 4),
        }
        if dbl:
            row["weights"] = loading.history
            row["eta"] = eta
        print(
            f"  {name}: overall ppl {row['overall_ppl']}  gap spread {row['gap_spread']}  "
            f"[{row['heal_seconds']}s heal]",
            flush=True,
        )
        return row

    for fraction in [float(f) for f in args.fractions.split(",")]:
        budget = int(source.num_parameters() * (1 - fraction))
        the_plan = plan(source, PruneTarget(param_budget=budget, axes=("depth", "mlp", "kv")))
        shape = Shape(
            the_plan.num_hidden_layers,
            source.config.hidden_size,
            the_plan.num_attention_heads,
            the_plan.num_key_value_heads,
            the_plan.intermediate_size,
        )
        print(f"{fraction:.0%} removed -> {shape}", flush=True)
        target = PruneTarget(
            num_hidden_layers=shape.num_hidden_layers,
            intermediate_size=shape.intermediate_size,
            num_key_value_heads=shape.num_key_value_heads,
        )
        runs: dict = {"shape": shape.__dict__}
        start = time.perf_counter()
        activation = prune(source, target, calibration, "activation").model
        act_seconds = round(time.perf_counter() - start, 1)
        runs["activation_pruned"] = measure(activation)
        learner = copy.deepcopy(source)
        options = MaskOptions(
            steps=args.mask_steps,
            seq_len=args.seq_len,
            mask_lr=args.mask_lr,
            multiplier_lr=args.multiplier_lr,
            model_lr=args.model_lr,
        )
        gates, mask_report = learn_masks(learner, shape, fixed_stream(0), options, device=args.device)
        learned = extract(learner, gates.keep())
        del learner
        mask_info = {
            "mask_steps": args.mask_steps,
            "mask_seconds": round(mask_report.seconds, 1),
            "expected": mask_report.expected,
            "target": mask_report.target,
        }
        runs["learned_pruned"] = {**measure(learned), **mask_info}
        print(
            f"  pruned: activation {runs['activation_pruned']['overall_ppl']} [{act_seconds}s], learned "
            f"{runs['learned_pruned']['overall_ppl']} [{mask_info['mask_seconds']}s mask phase, expected "
            f"{mask_report.expected} of target {mask_report.target}]",
            flush=True,
        )
        for tag, eta in [*dbl_arms, ("fixed", None)]:
            runs[f"learned_{tag}"] = healed(
                f"learned {tag}", copy.deepcopy(learned), args.heal_steps, eta, mask_info
            )
            if args.learned_only:
                continue
            runs[f"activation_{tag}"] = healed(
                f"activation {tag}",
                copy.deepcopy(activation),
                args.heal_steps,
                eta,
                {"prune_seconds": act_seconds},
            )
        if args.learned_only:
            results["runs"][f"{fraction:g}"] = runs
            continue
        baseline = extract(source, first_components(Shape.of(source.config), shape))
        runs["first_layers_fixed"] = healed(
            "first layers fixed", baseline, args.mask_steps + args.heal_steps, None, {}
        )
        results["runs"][f"{fraction:g}"] = runs
        if args.out:  # after each fraction, so a cut-short run keeps what it measured
            Path(args.out).write_text(json.dumps(results, indent=1))

    if args.learned_only:
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=1))
        return results
    print("\n| removed | arm | overall ppl | " + " | ".join(names) + " | gap spread | steps | seconds |")
    print("|---|---|---|" + "---|" * len(names) + "---|---|---|")
    for fraction, runs in results["runs"].items():
        tags = ("fixed", *(tag for tag, _ in dbl_arms))
        arms = [f"{kind}_{tag}" for kind in ("activation", "learned") for tag in tags]
        for arm in (*arms, "first_layers_fixed"):
            r = runs[arm]
            steps = r["heal_steps"] + (r.get("mask_steps", 0) if arm.startswith("learned") else 0)
            secs = r["heal_seconds"] + (r.get("mask_seconds", 0) if arm.startswith("learned") else 0)
            print(
                f"| {float(fraction):.0%} | {arm} | {r['overall_ppl']} | "
                + " | ".join(str(r["ppl"][n]) for n in names)
                + f" | {r['gap_spread']} | {steps} | {secs:.0f} |"
            )
    last = results["runs"][max(results["runs"], key=float)]
    summary = (
        f"shearing: at {float(max(results['runs'], key=float)):.0%} removed, learned+DBL overall ppl "
        f"{last['learned_dbl']['overall_ppl']} vs activation {last['activation_fixed']['overall_ppl']} "
        f"(activation+DBL {last['activation_dbl']['overall_ppl']}, first-layers baseline "
        f"{last['first_layers_fixed']['overall_ppl']}, source {results['source']['overall_ppl']}); "
        f"gap spread DBL {last['learned_dbl']['gap_spread']} vs fixed {last['learned_fixed']['gap_spread']}"
    )
    results["summary"] = summary
    print(summary)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
