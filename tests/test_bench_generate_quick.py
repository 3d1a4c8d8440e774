"""bench/generate_vs_llamacpp.py --quick runs end to end, checks exactness and prints its summary line."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NUMBER = r"(nan|[0-9.]+)"
SUMMARY = re.compile(
    rf"^decode: full_vs_llamacpp_q8={NUMBER} exit60_vs_llamacpp_q8={NUMBER} "
    rf"depth_efficiency_min={NUMBER} exact_fp32=(true|false)$"
)
PARITY = re.compile(
    rf"^decode_parity: int8_vs_q8_0={NUMBER} int4_vs_q4_0={NUMBER} int8_vs_q8_0_1b={NUMBER} "
    rf"int4_vs_q4_0_1b={NUMBER} frontier_wins=(n/a|[0-5]/5)$"
)


def test_quick_generation_bench_is_exact_and_prints_both_summary_lines():
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "generate_vs_llamacpp.py"), "--quick", "--threads", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    *_, decode_line, parity_line = result.stdout.strip().splitlines()
    match = SUMMARY.match(decode_line)
    assert match, result.stdout[-500:]
    assert match.group(4) == "true"  # float32 greedy equals HF generate and the uncached reference
    parity = PARITY.match(parity_line)
    assert parity, result.stdout[-500:]
    assert parity.group(5) == "n/a"  # no llama.cpp in quick mode: no frontier comparison is claimed
    assert "| strata | int8 | 2 |" in result.stdout  # the batched row
    assert "| float32 d4 |" in result.stdout and "Pareto front" in result.stdout  # the quality points
    assert float(match.group(3)) > 0
    for precision in ("float32", "bfloat16", "int8"):
        assert f"| strata | {precision} | 4 |" in result.stdout
    assert "| HF generate | float32 | 4 |" in result.stdout


GPU_SUMMARY = re.compile(
    rf"^gpu_decode: full_vs_hf_eager={NUMBER} exit60_vs_hf_eager={NUMBER} graphs_vs_eager={NUMBER} "
    rf"batch_vs_hf={NUMBER} exact_fp32=(true|false)$"
)


def test_quick_gpu_bench_runs_where_there_is_no_gpu_and_prints_its_summary_line():
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "generate_gpu.py"),
            "--quick",
            "--new-tokens",
            "8",
            "--batch",
            "2",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    match = GPU_SUMMARY.match(result.stdout.strip().splitlines()[-1])
    assert match, result.stdout[-500:]
    assert match.group(5) == "true"
    assert "| HF generate (eager) | float32 | 4 | 1 |" in result.stdout
    assert "| bfloat16 | 4 | 2 |" in result.stdout  # the batched row
