"""Held-out quality of a model's exits with the adapters stored beside it (float32), as the targets read it.

    python -m bench.exit_quality --model DIR [--exits 15,21,24,27] [--text heldout_prose.txt]

DIR is a model directory with `exit_adapters.safetensors` (for example `STRATA_HOME/models/<id>` after a
`fit_exits` job). Scores every exit on workers/data/heldout.txt (the profile's held-out text; `--text` names
another file, e.g. the bundled heldout_prose.txt; neither is ever fitted on): perplexity and top-1
agreement with full depth, plain and through the adapter, as ratios to full depth; prints a table and one
summary line at 90 / 80 / 70 / 50 % of depth.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from workers.early_exit.adapters import load_adapters
from workers.early_exit.forward import num_layers
from workers.generation.profiler import HELDOUT_PATH, measure_quality
from workers.jobs.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--exits", default="", help="comma-separated exits (default: every exit)")
    parser.add_argument("--heldout-tokens", type=int, default=8192)
    parser.add_argument("--text", default=HELDOUT_PATH.name, help="a text file in workers/data, or a path")
    args = parser.parse_args()
    model, tokenizer = load_model(args.model)
    layers = num_layers(model)
    adapters = load_adapters(args.model, layers, model.config.hidden_size)
    if adapters is None:
        raise SystemExit(f"{args.model} has no exit adapters")
    grid = (
        sorted({int(k) for k in args.exits.split(",") if k} | {layers})
        if args.exits
        else list(range(1, layers + 1))
    )
    path = Path(args.text) if Path(args.text).is_file() else HELDOUT_PATH.with_name(args.text)
    heldout = tokenizer.encode(path.read_text(encoding="utf-8"))[: args.heldout_tokens]
    quality = measure_quality(model, heldout, grid, 256, adapters=adapters)
    full = quality[layers].perplexity
    print(f"{path.name}: {quality[layers].tokens} tokens, full-depth perplexity {full:.2f}")
    print("| exit | depth | plain ratio | adapter ratio | scale | adapter top-1 |")
    print("|---:|---:|---:|---:|---:|---:|")
    ratios: dict[int, float] = {}
    for k in sorted(quality):
        q = quality[k]
        if k == layers or q.adapter_perplexity is None:
            continue
        ratios[k] = q.adapter_perplexity / full
        scale = adapters.maps[k].scale
        print(
            f"| {k} | {round(100 * k / layers)}% | {q.perplexity / full:.3g}x | {ratios[k]:.2f}x "
            f"| {scale:.3f} | {q.adapter_top1_agreement:.3f} |"
        )
    targets = {0.9: 1.5, 0.8: 2.0, 0.7: 3.0, 0.5: 5.0}
    parts = [
        f"{round(100 * f)}%: {ratios[round(f * layers)]:.2f}x (target {t:g}x)"
        for f, t in targets.items()
        if round(f * layers) in ratios
    ]
    print("exit quality: " + ", ".join(parts))


if __name__ == "__main__":
    main()
