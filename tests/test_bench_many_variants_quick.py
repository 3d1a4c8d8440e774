"""bench/many_variants.py --quick runs end to end (a tiny random model, N = 1, 4) and prints its summary."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NUMBER = r"([0-9.]+)"
SUMMARY = re.compile(
    rf"^many_variants: n=(\d+) throughput_vs_single={NUMBER} p99_vs_single={NUMBER} "
    rf"bytes_per_variant_vs_base={NUMBER} ppl_delta_max={NUMBER}$"
)


def test_quick_many_variants_bench_prints_its_table_and_summary_line():
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "many_variants.py"), "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    match = SUMMARY.match(result.stdout.strip().splitlines()[-1])
    assert match, result.stdout[-800:]
    assert match.group(1) == "4" and float(match.group(2)) > 0 and float(match.group(4)) > 0
    assert float(match.group(5)) < 0.05  # stored within the error budget: perplexity barely moves
    for mode in ("single", "deltas", "copies"):
        assert f"| 4 | {mode} |" in result.stdout
