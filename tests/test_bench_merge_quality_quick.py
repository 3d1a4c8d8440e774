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


def test_quick_bench_prints_the_table_and_summary_line(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "merge_quality.py"), "--quick", "--work", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    match = SUMMARY.search(result.stdout)
    assert match, result.stdout[-2000:]
    assert int(match.group(1)) == 1 + 3 + 3 + 2  # base, specialists, merges, DARE with and without rescale
    for row in ("| base |", "| specialist topic |", "| ties |", "| DARE extract drop=0.9 rescale=no |"):
        assert row in result.stdout
    assert (tmp_path / "specialist-extract" / "finetune.json").is_file()
