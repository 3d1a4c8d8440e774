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


def test_quick_generation_bench_is_exact_and_prints_the_summary_line():
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "generate_vs_llamacpp.py"), "--quick", "--threads", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    match = SUMMARY.match(result.stdout.strip().splitlines()[-1])
    assert match, result.stdout[-500:]
    assert match.group(4) == "true"  # float32 greedy equals HF generate and the uncached reference
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
