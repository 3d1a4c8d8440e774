"""bench/distill_step_by_step.py --quick runs end to end (students at three sizes, the teacher's few-shot
answers filtered) and prints its table and summary line."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUMMARY = re.compile(
    r"^distill_step_by_step: sbs_beats_label_only=(\d)/4 data_fraction_to_match=\S+ sbs_100=[0-9.]+ "
    r"label_only_100=[0-9.]+ teacher_few_shot=[0-9.]+ teacher_kept=\d+/4 distill_labels=\S+ seconds=\d+$",
    re.MULTILINE,
)


def test_quick_bench_prints_the_table_and_summary_line(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "distill_step_by_step.py"), "--quick", "--work", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert SUMMARY.search(result.stdout), result.stdout[-2000:]
    for row in ("| step_by_step |", "| label_only |", "| teacher tiny-random 2-shot CoT (4 held-out) |"):
        assert row in result.stdout
    assert list(tmp_path.glob("teacher-*.jsonl"))  # the teacher's answers are cached
