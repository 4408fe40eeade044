"""`sekisho bench usb` (and `--vs-usbguard`) runs end to end and ends with its JSON summary line."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest


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


def _vs_processes() -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if "sekisho-bench-vs-usbguard-" in cmdline:
                found.append(cmdline)
    return found


def test_bench_usb_vs_usbguard_reports_both_and_cleans_up() -> None:
    from sekisho.bench.usb_vs_usbguard import vs_usbguard_unavailable

    reason = vs_usbguard_unavailable()
    if reason is not None:
        print(f"skipping bench usb --vs-usbguard: {reason}", file=sys.stderr)
        pytest.skip(reason)
    folders = set(Path(tempfile.gettempdir()).glob("sekisho-bench-vs-usbguard-*"))
    result = subprocess.run(
        [sys.executable, "-m", "sekisho", "bench", "usb", "--count", "30", "--vs-usbguard", "--usbguard-count", "9"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:] + result.stdout[-2000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert list(summary)[:4] == ["decision_p50_ms", "decision_p99_ms", "usbguard_p50_ms", "usbguard_p99_ms"]
    assert summary["usbguard_n"] == 9 and summary["verdicts_differ"] == 0
    assert summary["guard_umockdev_p50_ms"] > 0 and summary["usbguard_p99_ms"] >= summary["usbguard_p50_ms"] >= 0
    # The daemon and the guard it started are gone, and so is their folder.
    assert _vs_processes() == []
    assert set(Path(tempfile.gettempdir()).glob("sekisho-bench-vs-usbguard-*")) <= folders
