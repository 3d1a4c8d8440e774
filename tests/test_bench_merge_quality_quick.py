"""bench/merge_quality.py --quick runs end to end (fine-tune, merge, DARE, score) and prints its summary."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUMMARY = re.compile(
    r"^merge_quality: best_method=\S+ retained_min=\S+ base_mean=[0-9.]+ specialist_own_mean=[0-9.]+ "
    r"dare90_retained=\S+ models=(\d+) seconds=\d+$",
    re.MULTILINE,
)


def run_bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "bench" / "merge_quality.py"), "--quick", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1800,
    )


def table(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith("|")]


def test_quick_bench_prints_the_table_and_summary_line(tmp_path):
    result = run_bench("--work", str(tmp_path))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    match = SUMMARY.search(result.stdout)
    assert match, result.stdout[-2000:]
    assert int(match.group(1)) == 1 + 3 + 3 + 2  # base, specialists, merges, DARE with and without rescale
    for row in ("| base |", "| specialist topic |", "| ties |", "| DARE extract drop=0.9 rescale=no |"):
        assert row in result.stdout
    assert (tmp_path / "specialist-extract" / "finetune.json").is_file()

    # a rerun over the same --work computes nothing and prints the same table from what is kept there
    (tmp_path / "tiny" / "model.safetensors").unlink()  # it could not score or merge anything anew
    again = run_bench("--work", str(tmp_path), "--cached-only")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert table(again.stdout) == table(result.stdout)
