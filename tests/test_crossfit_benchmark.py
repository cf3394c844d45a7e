"""benchmarks/crossfit_test_window.py on the tiny demo set: every variant and setup prints a finite ratio."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "crossfit_test_window.py"
LINE = re.compile(r"^\s*(\w+)\s+(\w+): ranker / repeat NDCG@20 (\S+) \(seeds (.+?); intervals (.+)\)$")


def test_every_variant_and_setup_gives_a_finite_ratio(demo_dir: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--data", str(demo_dir), "--seeds", "1", "--folds", "2",
         "--variants", "base", "presence"],
        capture_output=True, text=True, timeout=600, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [m.groups() for line in done.stdout.splitlines() if (m := LINE.match(line))]
    assert [(variant, setup) for variant, setup, *_ in rows] == [
        (variant, setup) for variant in ("base", "presence")
        for setup in ("windows", "test_folds", "windows_and_test_folds")
    ]
    for _, _, mean, _, interval in rows:
        low, high = (float(v) for v in interval.split("-"))
        assert 0.0 < float(mean) < 10.0
        assert low <= high

