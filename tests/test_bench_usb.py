"""`sekisho bench usb` runs end to end and ends with its JSON summary line."""

from __future__ import annotations

import json
import subprocess
import sys


def test_bench_usb_prints_summary() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sekisho", "bench", "usb", "--count", "200"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert list(summary)[:2] == ["decision_p50_ms", "decision_p99_ms"]
    assert {"baseline_p50_ms", "baseline_p99_ms"} <= set(summary)
    assert all(isinstance(v, float | int) and v > 0 for v in summary.values())
