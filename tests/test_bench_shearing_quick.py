"""bench/shearing.py --quick still runs end to end (every arm, both fractions, a DBL arm per --eta value) and
prints its summary line."""

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NUMBER = r"[0-9.]+"
SUMMARY = re.compile(
    rf"^shearing: at 50% removed, learned\+DBL overall ppl {NUMBER} vs activation {NUMBER} "
    rf"\(activation\+DBL {NUMBER}, first-layers baseline {NUMBER}, source {NUMBER}\); "
    rf"gap spread DBL {NUMBER} vs fixed {NUMBER}$",
    re.MULTILINE,
)


def test_quick_shearing_bench_prints_the_table_and_summary(tmp_path):
    out = tmp_path / "shear.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.shearing",
            "--quick",
            "--eta",
            "0.1,1",
            "--work",
            str(tmp_path),
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert SUMMARY.match(result.stdout.strip().splitlines()[-1]), result.stdout[-500:]
    runs = json.loads(out.read_text())["runs"]
    assert set(runs) == {"0.15", "0.5"}
    for arms in runs.values():
        assert arms["learned_dbl"]["weights"][0]["step"] == 0 and len(arms["learned_dbl"]["weights"]) > 1
        for kind in ("learned", "activation"):
            assert (arms[f"{kind}_dbl"]["eta"], arms[f"{kind}_dbl_eta1"]["eta"]) == (0.1, 1.0)
            assert "eta" not in arms[f"{kind}_fixed"]
        assert arms["learned_fixed"]["params"] == arms["activation_fixed"]["params"]
        assert arms["first_layers_fixed"]["params"] == arms["activation_fixed"]["params"]
