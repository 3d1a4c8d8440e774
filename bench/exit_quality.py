"""Held-out quality of a model's exits with the adapters stored beside it (float32), as the targets read it,
on every held-out text (`workers/eval/heldout.py`) and the worst of them.

    python -m bench.exit_quality --model DIR [--model DIR2 ...] [--base MODEL_DIR] [--exits 15,21,24,27]
                                 [--texts heldout,dpkg-spec] [--text FILE] [--per-exit] [--no-pointer]

DIR is a model directory with `exit_adapters.safetensors` (for example `STRATA_HOME/models/<id>` after a
`fit_exits` job; pass the default job's model and the distilled job's model to compare them), or a directory
of adapters alone (`bench.exit_adapters --out DIR`, and its `DIR/ridge`) with `--base MODEL_DIR`. For each
held-out text (default: every one but "broad", a mix of the others; `--text` adds a file) and each exit: the
perplexity through the adapter as a ratio to full depth's on the same text; in-domain texts (held-out splits
of fitting sources, the project's own heldout.txt and heldout_prose.txt) and out-of-domain ones (sources no
fitting text comes from) apart, then the worst of each. `--per-exit` scores every exit and adds the detail
of the first text (plain ratio, scale, top-1). Exits are scored as served, with their pointers
(`workers/early_exit/pointer.py`) where the adapters have them; `--no-pointer` scores the affine exits alone.
One summary line per model at 90 / 80 / 70 / 50 % of depth on the worst out-of-domain text, heldout.txt's
figure beside it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from workers.early_exit.adapters import load_adapters
from workers.early_exit.forward import num_layers
from workers.eval.heldout import DEFAULT_EVAL_TEXT, HeldoutText, heldout_texts
from workers.generation.profiler import measure_quality
from workers.jobs.models import load_model

FRACTIONS = (0.9, 0.8, 0.7, 0.5)
TARGETS = {0.9: 1.5, 0.8: 2.0, 0.7: 3.0, 0.5: 5.0}  # the distilled targets; default fit: 1.6 / 2.3 / 3.5 / 6


def _texts(names: str, extra: Path | None) -> list[HeldoutText]:
    every = heldout_texts()
    chosen = (
        [every[n] for n in names.split(",") if n]
        if names
        else [t for n, t in every.items() if n != DEFAULT_EVAL_TEXT]
    )
    if extra is not None:
        chosen.append(HeldoutText(extra.name, extra.read_text(encoding="utf-8"), "file", True))
    return chosen


def score(
    model_dir: Path,
    texts: list[HeldoutText],
    exits: list[int] | None,
    max_tokens: int,
    per_exit: bool,
    base: Path | None = None,
    pointers: bool = True,
) -> None:
    model, tokenizer = load_model(base or model_dir)
    layers = num_layers(model)
    adapters = load_adapters(model_dir, layers, model.config.hidden_size)
    if adapters is None:
        raise SystemExit(f"{model_dir} has no exit adapters")
    if not pointers:
        adapters = adapters.without_pointers()
    grid = sorted(set(exits or [round(f * layers) for f in FRACTIONS]) | {layers})
    if per_exit:
        grid = list(range(1, layers + 1))
    ratios: dict[str, dict[int, float]] = {}
    print(f"\n## {model_dir}{'' if pointers else ' (no pointers)'}\n")
    print("| text | kind | tokens | full ppl | " + " | ".join(f"exit {k}" for k in grid if k < layers) + " |")
    print("|---|---|---:|---:|" + "---:|" * (len(grid) - 1))
    for index, text in enumerate(texts):
        ids = tokenizer.encode(text.text)[:max_tokens]
        quality = measure_quality(model, ids, grid, 256, adapters=adapters)
        full = quality[layers].perplexity
        ratios[text.name] = {
            k: q.adapter_perplexity / full for k, q in quality.items() if q.adapter_perplexity is not None
        }
        kind = "out-of-domain" if text.out_of_domain else "in-domain"
        cells = " | ".join(f"{ratios[text.name].get(k, float('nan')):.2f}x" for k in grid if k < layers)
        print(f"| {text.name} | {kind} | {quality[layers].tokens} | {full:.2f} | {cells} |", flush=True)
        if per_exit and index == 0:
            for k in grid[:-1]:
                q = quality[k]
                print(
                    f"|   exit {k} ({round(100 * k / layers)}%) | plain {q.perplexity / full:.3g}x | "
                    f"scale {adapters.maps[k].scale:.3f} | top-1 {q.adapter_top1_agreement:.3f} |"
                )
    for kind, flag in (("in-domain", False), ("out-of-domain", True)):
        names = [t.name for t in texts if t.out_of_domain == flag]
        if names:
            worst = {k: max(ratios[n][k] for n in names) for k in grid if k < layers}
            cells = " | ".join(f"{worst[k]:.2f}x" for k in grid if k < layers)
            print(f"| worst {kind} | | | | {cells} |")
    out = [t.name for t in texts if t.out_of_domain]
    parts = []
    for f, target in TARGETS.items():
        k = round(f * layers)
        if out and all(k in ratios[n] for n in out):
            worst = max(ratios[n][k] for n in out)
            own = f", heldout {ratios['heldout'][k]:.2f}x" if "heldout" in ratios else ""
            parts.append(f"{round(100 * f)}%: {worst:.2f}x (target {target:g}x{own})")
    label = model_dir.name + ("" if pointers else ", no pointers")
    print(f"exit quality ({label}, worst out-of-domain): " + ", ".join(parts))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, action="append", required=True)
    parser.add_argument(
        "--base",
        type=Path,
        help="the model every --model DIR's adapters belong to, when DIR holds only adapters "
        "(bench.exit_adapters' --out)",
    )
    parser.add_argument("--exits", default="", help="comma-separated (default: 90/80/70/50 %% depth)")
    parser.add_argument("--texts", default="", help="held-out text names (default: all)")
    parser.add_argument("--text", type=Path, help="one more text file, counted as out-of-domain")
    parser.add_argument("--heldout-tokens", type=int, default=8192)
    parser.add_argument("--per-exit", action="store_true", help="every exit; detail on the first text")
    parser.add_argument("--no-pointer", action="store_true", help="the affine exits without their pointers")
    args = parser.parse_args()
    texts = _texts(args.texts, args.text)
    exits = [int(k) for k in args.exits.split(",") if k] or None
    for model_dir in args.model:
        score(model_dir, texts, exits, args.heldout_tokens, args.per_exit, args.base, not args.no_pointer)


if __name__ == "__main__":
    main()
