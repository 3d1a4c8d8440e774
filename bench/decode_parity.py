"""Parts of bench/generate_vs_llamacpp.py that compare Strata with llama.cpp precision for precision, at the
TinyLlama-1.1B shape, in memory, and on the quality-speed frontier.

- Precision for precision: Strata float32 / bfloat16 / int8 / int4 against llama.cpp F32 / BF16 and F16 /
  Q8_0 / Q4_0 and Q4_1 (`PARITY`).
- The 1.1B shape: a random-weight LLaMA of TinyLlama-1.1B's shape (`TINYLLAMA_1B`), written tensor by tensor
  (bench/random_llama.py), with a word-level tokenizer of its 32000 ids, and converted to a float32 GGUF by
  the llama.cpp driver, then quantised by llama.cpp. Decoding speed does not depend on the weights' values
  (every step reads every weight and does the same arithmetic whatever they are), so random weights time
  exactly what a trained model of that shape would; only the tokens differ.
- Memory: each engine decodes in a process of its own (`python bench/decode_parity.py strata ...` for
  Strata, a fresh driver for llama.cpp), which then reports its peak resident set (VmHWM).
- The frontier: every (precision, depth, exit adapter) of Strata and every quantisation llama.cpp's
  quantiser makes (`FRONTIER_QUANTS`), each a point (decode tok/s, held-out perplexity / Strata float32
  full-depth perplexity) on the same tokens: windows of the "dpkg-spec" held-out source, which no exit
  fitting text comes from (workers/eval/heldout.py). llama.cpp's perplexity comes from its own logits of
  every position (logits_all). Its Pareto front, a plot, and the fastest configuration of each engine within
  each of `QUALITY_LEVELS`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.peak_rss import peak_rss_mb, rss_mb  # noqa: E402
from workers.generation.profiler import served_scores, target_scores  # noqa: E402

TINYLLAMA_1B = dict(
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    vocab_size=32000,
    tie_word_embeddings=False,
)
PARITY: dict[str, tuple[str, ...]] = {  # Strata precision -> the llama.cpp types of the same weight bits
    "float32": ("f32",),
    "bfloat16": ("bf16", "f16"),
    "int8": ("q8_0",),
    "int4": ("q4_0", "q4_1"),
}
FRONTIER_QUANTS = ("q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0", "q3_k_m", "q2_k")
QUALITY_LEVELS = (1.05, 1.25, 1.5, 2.0, 3.0)
HELDOUT_SOURCE = "dpkg-spec"


# -------------------------------------------------------------------------------------------- the 1.1B shape


def word_tokenizer(path: Path, vocab: int) -> None:
    """A word-level tokenizer of `vocab` ids (w0 .. w<vocab-1>; w0 unknown, w2 EOS): the engine decodes text
    from ids, the bench feeds ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(vocab={f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0", eos_token="w2").save_pretrained(path)


def random_1b(work: Path) -> Path:
    """The random TinyLlama-1.1B-shaped model in safetensors (float32, ~4.4 GB), made once."""
    from bench.random_llama import write_random_llama

    path = work / "random-tinyllama-1.1b"
    if not (path / "tokenizer.json").exists():
        print("writing a random TinyLlama-1.1B-shaped model (once)", flush=True)
        partial = work / "random-tinyllama-1.1b.partial"
        write_random_llama(partial, TINYLLAMA_1B)
        word_tokenizer(partial, TINYLLAMA_1B["vocab_size"])
        partial.replace(path)
    return path


def gguf_1b(driver, model_dir: Path, work: Path, kinds: tuple[str, ...]) -> dict[str, Path]:
    """GGUFs of the random 1.1B model: float32 converted from its safetensors, the rest quantised from it."""
    f32 = work / "random-tinyllama-1.1b.f32.gguf"
    if not f32.exists():
        print("converting the 1.1B model to GGUF (once)", flush=True)
        partial = f32.with_suffix(".partial")
        driver.ask(cmd="convert", source=str(model_dir), target=str(partial))
        partial.replace(f32)
    paths = {"f32": f32}
    for kind in kinds:
        path = work / f"random-tinyllama-1.1b.{kind}.gguf"
        if kind != "f32" and not path.exists():
            partial = path.with_suffix(".partial")
            driver.ask(cmd="quantize", source=str(f32), target=str(partial), type=kind)
            partial.replace(path)
        paths[kind] = path
    return paths


# ------------------------------------------------------------------------------------------------- quality


def heldout_windows(tokenizer, vocab: int, length: int, count: int) -> list[list[int]]:
    """`count` consecutive windows of `length` tokens of the never-fitted held-out source (random ids for a
    toy tokenizer that cannot encode it)."""
    from workers.eval.heldout import heldout_texts

    ids = tokenizer.encode(heldout_texts()[HELDOUT_SOURCE].text, add_special_tokens=False)
    if len(set(ids[:length])) < length // 4:
        generator = torch.Generator().manual_seed(1)
        ids = torch.randint(2, vocab, (length * count,), generator=generator).tolist()
    windows = [ids[i : i + length] for i in range(0, len(ids) - length + 1, length)]
    return windows[:count]


def strata_nll(compact, windows: list[list[int]], configs: list[tuple[int, bool]]) -> dict:
    """(depth, exit adapter) -> (summed NLL of tokens 2..n of every window, tokens scored), from one pass of
    the compact model per window (its residual stream at every wanted depth); exits with adapters are scored
    as served (`served_scores`: with their pointers, as the profile scores them)."""
    totals = {config: [0.0, 0] for config in configs}
    depths = sorted({depth for depth, _ in configs})
    for window in windows:
        ids = torch.tensor([window], device=compact.device)
        hidden = compact.residuals(ids, depths)
        for depth, adapter in configs:
            states = hidden[depth][0, :-1]
            if adapter and compact.has_adapter(depth):  # as served: with the exit's pointer, if any
                losses, _ = served_scores(compact, states, depth, ids[0, 1:])
            else:
                losses, _ = target_scores(compact.logits(states, depth, adapter), ids[0, 1:])
            totals[(depth, adapter)][0] += float(losses.double().sum())
            totals[(depth, adapter)][1] += len(window) - 1
    return {config: (nll, count) for config, (nll, count) in totals.items()}


def fit_adapters(model, tokenizer, work: Path, exits: list[int], max_tokens: int):
    """Ridge + scale exit adapters (the fit_exits job's default method) at `exits`, on the bundled default
    fitting text cut at `max_tokens`, fitted once and cached in `work`."""
    from workers.early_exit.adapters import load_adapters
    from workers.early_exit.fit import FitConfig, fit_exit_adapters, token_windows
    from workers.early_exit.fit_data import bundled_records, fitting_stream

    layers = model.config.num_hidden_layers
    folder = work / f"adapters-{max_tokens}-{'-'.join(map(str, exits))}"
    adapters = load_adapters(folder, layers, model.config.hidden_size)
    if adapters is not None:
        return adapters
    print(f"fitting exit adapters at {exits} on {max_tokens} tokens (once)", flush=True)
    ids, _ = fitting_stream(tokenizer, bundled_records(), max_tokens)
    fitted = fit_exit_adapters(model, token_windows(ids, 256), exits, FitConfig())
    folder.mkdir(parents=True, exist_ok=True)
    fitted.adapters.save(folder, {"bench": "decode_parity", "tokens": len(ids)})
    return fitted.adapters


# ------------------------------------------------------------------------------------------------ frontier


@dataclass(frozen=True)
class Point:
    engine: str  # "strata" or "llama.cpp"
    config: str
    tok_s: float
    ratio: float  # held-out perplexity over Strata's float32 full-depth perplexity


def pareto(points: list[Point]) -> list[Point]:
    """Points no other point beats on both speed and quality, fastest first."""
    front = [
        p
        for p in points
        if not any(
            (q.tok_s >= p.tok_s and q.ratio <= p.ratio) and (q.tok_s > p.tok_s or q.ratio < p.ratio)
            for q in points
        )
    ]
    return sorted(front, key=lambda p: -p.tok_s)


def fastest_within(points: list[Point], engine: str, level: float) -> Point | None:
    eligible = [p for p in points if p.engine == engine and p.ratio <= level]
    return max(eligible, key=lambda p: p.tok_s) if eligible else None


def frontier_lines(points: list[Point], levels: tuple[float, ...] = QUALITY_LEVELS) -> tuple[list[str], int]:
    """The Pareto table and the fastest configuration of each engine at each quality level; the number of
    levels at which Strata's fastest meets or beats llama.cpp's (or only Strata meets it)."""
    lines = [
        "Pareto front (decode tok/s against held-out perplexity ratio to Strata float32 full depth):",
        "",
        "| engine | configuration | decode tok/s | perplexity ratio |",
        "|---|---|---|---|",
        *(f"| {p.engine} | {p.config} | {p.tok_s:.1f} | {p.ratio:.3f} |" for p in pareto(points)),
        "",
        "Fastest configuration of each engine within each quality level:",
        "",
        "| ratio <= | Strata | tok/s | llama.cpp | tok/s | Strata / llama.cpp |",
        "|---|---|---|---|---|---|",
    ]
    wins = 0
    for level in levels:
        ours, theirs = fastest_within(points, "strata", level), fastest_within(points, "llama.cpp", level)
        win = ours is not None and (theirs is None or ours.tok_s >= theirs.tok_s)
        wins += win
        ratio = f"{ours.tok_s / theirs.tok_s:.2f}" if ours and theirs else ("only Strata" if win else "n/a")
        lines.append(
            f"| {level:g} | {ours.config if ours else 'none'} | {ours.tok_s if ours else 0:.1f} | "
            f"{theirs.config if theirs else 'none'} | {theirs.tok_s if theirs else 0:.1f} | {ratio} |"
        )
    return lines, wins


def plot(points: list[Point], path: Path, title: str) -> bool:
    """A scatter of every point and each engine's front as a PNG; False where matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figure, axes = plt.subplots(figsize=(8, 5.5))
    for engine, colour in (("strata", "tab:blue"), ("llama.cpp", "tab:red")):
        mine = [p for p in points if p.engine == engine]
        axes.scatter(
            [p.ratio for p in mine], [p.tok_s for p in mine], s=14, color=colour, alpha=0.5, label=engine
        )
        front = sorted(pareto(mine), key=lambda p: p.ratio)
        axes.plot([p.ratio for p in front], [p.tok_s for p in front], color=colour, lw=1.5)
        for p in front:
            axes.annotate(p.config, (p.ratio, p.tok_s), fontsize=6, xytext=(3, 3), textcoords="offset points")
    for level in QUALITY_LEVELS:
        axes.axvline(level, color="grey", lw=0.5, ls=":")
    axes.set_xscale("log")
    axes.set_xlabel("held-out perplexity / Strata float32 full depth (log)")
    axes.set_ylabel("decode tok/s (batch 1)")
    axes.set_title(title, fontsize=9)
    axes.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


# ------------------------------------------------------------------------------ one engine in its own process


def strata_process(model_dir: Path, precision: str, prompt: list[int], new_tokens: int, threads: int) -> dict:
    """Strata decoding in a process of its own: {"decode_tok_s", "ttft_ms", "peak_rss_mb"}."""
    import subprocess

    command = [
        sys.executable,
        str(Path(__file__)),
        "strata",
        "--model",
        str(model_dir),
        "--precision",
        precision,
        "--new-tokens",
        str(new_tokens),
        "--threads",
        str(threads),
    ]
    answer = subprocess.run(command, input=json.dumps(prompt), capture_output=True, text=True, check=False)
    if answer.returncode != 0:
        raise RuntimeError(f"strata process ({precision}) failed: {answer.stderr.strip()[-300:]}")
    return json.loads(answer.stdout.strip().splitlines()[-1])


def _strata_main(args: argparse.Namespace) -> None:
    from workers.generation.engine import GenerationRequest
    from workers.inference.worker import load_engine

    torch.set_num_threads(args.threads)
    prompt = json.loads(sys.stdin.read())
    # as an inference worker loads it: layers read one at a time, the source's weights freed
    engine = load_engine(Path(args.model), torch.device("cpu"), precision=args.precision, serve_only=True)
    layers = engine.num_layers

    def once(tokens: int):
        request = GenerationRequest(prompt_ids=prompt, depth=layers, max_new_tokens=tokens, ignore_eos=True)
        return engine.run([request])[0]

    once(4)  # warm-up: caches allocated, weights paged in
    started = time.perf_counter()
    result = once(args.new_tokens)
    print(
        json.dumps(
            {
                "decode_tok_s": (args.new_tokens - 1) / result.decode_ms * 1000,
                "ttft_ms": result.prefill_ms,
                "wall_s": time.perf_counter() - started,
                "peak_rss_mb": peak_rss_mb(),
                "rss_mb": rss_mb(),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="one Strata engine decoding in its own process")
    sub = parser.add_subparsers(dest="command", required=True)
    strata = sub.add_parser("strata", help="read a prompt (JSON ids) on stdin, print one JSON line")
    strata.add_argument("--model", type=Path, required=True)
    strata.add_argument("--precision", required=True)
    strata.add_argument("--new-tokens", type=int, default=32)
    strata.add_argument("--threads", type=int, default=2)
    _strata_main(parser.parse_args())
