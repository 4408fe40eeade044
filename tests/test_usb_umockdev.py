"""The real udev path: SysfsUsb and UdevHotplug under umockdev-run, on Debian's /usr/bin/python3.

testbed.md: hot-plug events reach pyudev's Monitor under umockdev only from /usr/bin/python3 with
Debian's python3-pyudev and gir1.2-umockdev-1.0, so the probe runs there, with the project on
PYTHONPATH (the driver needs only the standard library and pyudev).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROBE = ROOT / "tests" / "data" / "usb" / "umockdev_probe.py"
SYSTEM_PYTHON = "/usr/bin/python3"


def _missing_prerequisite() -> str | None:
    if shutil.which("umockdev-run") is None:
        return "umockdev-run not installed (apt-get install umockdev gir1.2-umockdev-1.0 python3-pyudev)"
    check = subprocess.run(
        [SYSTEM_PYTHON, "-c", "import gi, pyudev; gi.require_version('UMockdev', '1.0')"],
        capture_output=True,
        text=True,
        check=False,
    )
    if check.returncode != 0:
        return f"{SYSTEM_PYTHON} lacks pyudev or UMockdev GIR: {check.stderr.strip().splitlines()[-1:]}"
    return None


def test_driver_under_umockdev() -> None:
    reason = _missing_prerequisite()
    if reason is not None:
        print(f"skipping umockdev test: {reason}", file=sys.stderr)
        pytest.skip(reason)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        ["umockdev-run", "--", SYSTEM_PYTHON, str(PROBE)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=ROOT,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["devices"] == ["usb1", "1-2"]
    assert result["interfaces"] == ["08:06:50"]
    assert result["parent_hash_ok"] is True
    assert result["authorized_after_deauthorize"] == "0"
    assert result["hubs_defaulted"] == ["usb1"] and result["authorized_default"] == "0"
    assert result["pyudev_sees"] == ["1-2", "usb1"]
    events = result["events"]
    assert ["add", "1-3", "046d:c31c", None] in events
    assert events[-1] == ["remove", "1-3", None, None]
