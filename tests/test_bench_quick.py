"""bench/merge_vs_mergekit.py --quick still runs end to end and prints its summary line."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MERGEKIT = Path(sys.executable).parent / "mergekit-yaml"
NUMBER = r"(n/a|nan|inf|[0-9.]+(?:e[+-][0-9]+)?)"
SUMMARY = re.compile(
    rf"^merge: wall_ratio_max={NUMBER} rss_ratio_max={NUMBER} max_abs_diff={NUMBER} "
    rf"floor_multiple_max={NUMBER}$",
    re.MULTILINE,
)


def test_quick_bench_prints_the_summary_line(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "merge_vs_mergekit.py"), "--quick", "--work", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,  # twelve rows, each through both tools
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    match = SUMMARY.match(lines[-1])
    assert match, lines[-1]
    wall, rss, diff, floor = match.groups()
    assert floor not in ("n/a", "nan")
    if MERGEKIT.exists():  # the quick mode compares against it only when it is installed here
        assert diff not in ("n/a", "nan") and float(diff) <= 1e-6
        assert wall not in ("n/a", "nan") and rss not in ("n/a", "nan")
    assert "| ties |" in result.stdout and "| 4x |" in result.stdout
