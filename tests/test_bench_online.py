"""bench/bench_online.py: its multiply-add count by hand, and a `--quick` smoke run that prints
the ratio lines (end to end: it starts several Python processes)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench.bench_online import cnn, macs, widths_for

REPO = Path(__file__).resolve().parents[1]


def test_multiply_adds_of_the_cnn1d_by_hand() -> None:
    """cnn1d on (1, 40): conv 5 → 20 positions, conv 3 → 10, conv 3 → 5, then a linear head:
    20·w·5 + 10·w·w·3 + 5·w·w·3 + 5w·10 = 45w² + 150w."""
    for w in (16, 29, 64):
        assert macs(cnn(w)) == 45 * w * w + 150 * w
    assert widths_for(16, (1, 3, 10)) == [16, 29, 54]


@pytest.mark.e2e
def test_quick_run_prints_the_ratios() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "bench_online.py"), "--quick", "--threads", "1"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert out.startswith("machine: CPU ")
    for line in ("wall-time ratio (a)/(b)", "CPU-time ratio (a)/(b)"):
        assert re.search(rf"^{re.escape(line)}: \d+\.\d\dx$", out, re.M), line
    rows = re.findall(r"^cnn1d:(\d+) +(\d+\.\d\d)x .* (\d+\.\d\d)x$", out, re.M)
    assert [w for w, _, _ in rows] == ["16", "29", "54"]
    assert [round(float(r)) for _, r, _ in rows] == [1, 3, 10]
    assert re.search(r"^mean test accuracy at α=1: \(a\) 0\.\d+  \(b\) 0\.\d+$", out, re.M)
    assert "load average after" in out
