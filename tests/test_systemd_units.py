"""The shipped systemd units: systemd's own parser accepts them, and each keeps the hardening it promises."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "deploy" / "systemd"
INSTALLED_VENV = "/opt/sekisho/current/venv"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")

pytestmark = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze is missing (Debian package systemd; ./dev.sh installs it)"
)

# Exposure scores of `systemd-analyze security` (0 = locked down, 10 = fully exposed) each unit must stay under.
# The terminal agent runs as root with CAP_SYS_ADMIN (BLKROSET), which is what costs it the most.
EXPOSURE_LIMIT = {
    "sekisho-controller.service": 2.0,
    "sekisho-ingest@.service": 2.0,
    "sekisho-doors.service": 2.0,
    "sekisho-terminal.service": 3.0,
}


def _units() -> list[Path]:
    return sorted(UNITS.glob("*.service"))


def _parse(path: Path) -> dict[str, list[str]]:
    """Return {Key: [values…]} of the [Service] and [Unit] sections (systemd keys may repeat)."""
    found: dict[str, list[str]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        found.setdefault(key.strip(), []).append(value.strip())
    return found


def _testable_copy(unit: Path, directory: Path, *, edit: tuple[str, str] | None = None) -> Path:
    """Copy a unit with its programs pointed at this checkout's venv (systemd-analyze checks they exist)."""
    text = unit.read_text(encoding="utf-8").replace(INSTALLED_VENV, sys.prefix)
    if edit is not None:
        assert edit[0] in text
        text = text.replace(*edit)
    target = directory / unit.name
    target.write_text(text, encoding="utf-8")
    return target


def _verify(unit: Path) -> subprocess.CompletedProcess[str]:
    assert SYSTEMD_ANALYZE is not None
    return subprocess.run(
        [SYSTEMD_ANALYZE, "verify", str(unit)], capture_output=True, text=True, timeout=60, cwd=unit.parent
    )


def _problems(run: subprocess.CompletedProcess[str]) -> list[str]:
    """What systemd-analyze said about the unit: anything at all, since a unit it is silent about is clean."""
    lines = [line for line in (run.stdout + run.stderr).splitlines() if line.strip()]
    if run.returncode != 0 and not lines:
        lines.append(f"exit {run.returncode}")
    return lines


def test_the_four_services_ship() -> None:
    names = {unit.name for unit in _units()}
    assert names == set(EXPOSURE_LIMIT)
    assert (UNITS / "sekisho.sysusers.conf").is_file()


@pytest.mark.parametrize("unit", _units(), ids=lambda p: p.name)
def test_systemd_analyze_verify_is_silent(unit: Path, tmp_path: Path) -> None:
    run = _verify(_testable_copy(unit, tmp_path))
    assert _problems(run) == [], run.stderr


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (("ProtectSystem=strict", "ProtectSytem=strict"), "Unknown key 'ProtectSytem'"),
        (("Restart=on-failure", "Restart=sometimes"), "Failed to parse service restart specifier"),
        (("bin/sekisho-agent doors", "bin/sekisho-agnet doors"), "is not executable"),
    ],
    ids=["misspelt-key", "bad-value", "missing-program"],
)
def test_a_broken_unit_fails_the_check(edit: tuple[str, str], expected: str, tmp_path: Path) -> None:
    run = _verify(_testable_copy(UNITS / "sekisho-doors.service", tmp_path, edit=edit))
    problems = _problems(run)
    assert problems, "systemd-analyze accepted a broken unit"
    assert any(expected in line for line in problems), problems


@pytest.mark.parametrize("unit", _units(), ids=lambda p: p.name)
def test_exposure_stays_under_its_limit(unit: Path, tmp_path: Path) -> None:
    assert SYSTEMD_ANALYZE is not None
    copy = _testable_copy(unit, tmp_path)
    run = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=true", "--no-pager", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d)", run.stdout)
    assert match, run.stdout + run.stderr
    assert float(match.group(1)) <= EXPOSURE_LIMIT[unit.name], run.stdout


@pytest.mark.parametrize("unit", _units(), ids=lambda p: p.name)
def test_every_unit_is_supervised_and_confined(unit: Path) -> None:
    keys = _parse(unit)
    assert keys["Type"] == ["notify"]
    assert keys["NotifyAccess"] == ["main"]
    assert int(keys["WatchdogSec"][0]) >= 10
    assert keys["Restart"] == ["on-failure"]
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "RestrictSUIDSGID", "ProtectKernelModules"):
        assert keys[key] == ["yes"], key
    assert keys["ProtectSystem"] == ["strict"]
    assert keys["AmbientCapabilities"] == [""]
    assert keys["UMask"] == ["0077"]
    assert keys["StateDirectory"], "state lives in a StateDirectory, not in /etc"
    assert keys["ExecStart"][0].startswith(INSTALLED_VENV + "/bin/"), "units run the release that `current` names"


def test_only_the_terminal_agent_runs_as_root_and_only_with_cap_sys_admin() -> None:
    for unit in _units():
        keys = _parse(unit)
        if unit.name == "sekisho-terminal.service":
            assert keys["User"] == ["root"]
            assert keys["CapabilityBoundingSet"] == ["CAP_SYS_ADMIN"]
            assert "ProtectKernelTunables" not in keys  # it writes /sys/bus/usb/devices/*/authorized
            assert keys["RuntimeDirectory"] == ["sekisho/pam sekisho/usb-rw"]
            assert keys["RuntimeDirectoryMode"] == ["0700"]  # pam_service.py refuses a socket dir others reach
        else:
            assert keys["User"][0] in {"sekisho", "sekisho-agent"}, unit.name
            assert keys["CapabilityBoundingSet"] == [""], unit.name
            assert keys["ProtectKernelTunables"] == ["yes"], unit.name


def test_agents_keep_state_out_of_etc_and_can_renew_their_certificate() -> None:
    for name in ("sekisho-terminal.service", "sekisho-doors.service"):
        keys = _parse(UNITS / name)
        assert "SEKISHO_AGENT_STATE_DIR=/var/lib/sekisho/agent" in keys["Environment"]
        assert keys["StateDirectory"] == ["sekisho/agent"]
        assert "/etc/sekisho/agent" in keys["ReadWritePaths"]


def test_the_sysusers_file_names_the_units_users() -> None:
    text = (UNITS / "sekisho.sysusers.conf").read_text(encoding="utf-8")
    declared = {line.split()[1] for line in text.splitlines() if line.startswith("u ")}
    users = {_parse(unit)["User"][0] for unit in _units()} - {"root"}
    assert users == declared
