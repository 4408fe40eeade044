"""Offline install on agent hosts: build the bundle, install it with no network, upgrade, roll back."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from agent_fixtures import write_agent_config
from support.bundles import agent_bundle

from sekisho.deploy.pki import AgentCredentials

ROOT = Path(__file__).resolve().parent.parent
LOCKS = ROOT / "requirements"
SERVER_ONLY = {"fastapi", "sqlalchemy", "uvicorn", "pyyaml", "alembic", "psycopg", "starlette"}
# Debian's Python, as on an agent host; the pyenv Python of this checkout is the same minor version.
HOST_PYTHON = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable


def _offline_prefix() -> list[str]:
    """Run in a network namespace of its own (no interface but lo) where this machine allows it."""
    unshare = shutil.which("unshare")
    if unshare and subprocess.run([unshare, "-n", "true"], capture_output=True).returncode == 0:
        return [unshare, "-n"]
    print("unshare -n is not permitted here: the install runs with --no-index and PIP_NO_INDEX only")
    return []


OFFLINE = _offline_prefix()


def _install(bundle: Path, root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*OFFLINE, "sh", str(bundle / "install-agent.sh"), "--root", str(root), "--python", HOST_PYTHON, *args],
        capture_output=True,
        text=True,
        timeout=900,
    )


def _current(root: Path) -> str | None:
    link = root / "opt" / "sekisho" / "current"
    return Path(link.readlink()).name if link.is_symlink() else None


def _previous(root: Path) -> str | None:
    link = root / "opt" / "sekisho" / "previous"
    return Path(link.readlink()).name if link.is_symlink() else None


def _lock_pins(name: str) -> dict[str, str]:
    sys.path.insert(0, str(LOCKS))
    try:
        import lock

        return lock.pins(name)
    finally:
        sys.path.remove(str(LOCKS))


def test_the_bundle_holds_every_locked_wheel_with_checked_hashes(tmp_path_factory: pytest.TempPathFactory) -> None:
    bundle = agent_bundle(tmp_path_factory, "good")
    check = subprocess.run(["sha256sum", "--check", "--quiet", "--strict", "SHA256SUMS"], cwd=bundle)
    assert check.returncode == 0
    manifest = json.loads((bundle / "wheelhouse.json").read_text())
    packages = manifest["packages"]
    pins = _lock_pins("agent")
    assert set(packages) == set(pins) | {"sekisho"}
    assert not SERVER_ONLY & set(packages)
    for name, version in pins.items():
        assert packages[name]["version"] == version
    # A wheel that was downloaded carries a hash the original lock lists; only packages built here
    # (no wheel for this platform, or built with other flags) get a hash the lock could not know.
    built = {name for name, item in packages.items() if item["origin"] in {"built", "built-with-flags"}}
    assert built <= {"pyscard", "libosdp"}, built
    lock_text = (bundle / "agent.lock.txt").read_text()
    for name, item in packages.items():
        if item["origin"] == "locked":
            assert f"sha256:{item['sha256']}" in lock_text, name
    pinned = (bundle / "requirements.txt").read_text()
    for item in packages.values():
        wheel = bundle / "wheels" / item["file"]
        digest = subprocess.run(["sha256sum", str(wheel)], capture_output=True, text=True).stdout.split()[0]
        assert digest == item["sha256"] and f"--hash=sha256:{digest}" in pinned


def test_install_offline_upgrade_and_roll_back(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, pki: Path
) -> None:
    good = agent_bundle(tmp_path_factory, "good")
    upgrade = agent_bundle(tmp_path_factory, "next")
    root = tmp_path / "host"
    root.mkdir()

    first = _install(good, root)
    assert first.returncode == 0, first.stdout + first.stderr
    assert _current(root) == "0.1.0" and _previous(root) is None
    venv = root / "opt" / "sekisho" / "current" / "venv"
    verify = subprocess.run(
        [sys.executable, str(LOCKS / "lock.py"), "verify", str(venv), "agent"], capture_output=True, text=True
    )
    assert verify.returncode == 0, verify.stderr
    again = _install(good, root)
    assert again.returncode == 0 and "nothing to do" in again.stdout

    # The health check runs the new release's own agent against a real agent config and its state.
    creds = AgentCredentials.at(pki, "agent-a")
    config = write_agent_config(tmp_path / "etc" / "agent.toml", creds, 8883)
    check = f'"$SEKISHO_VENV/bin/sekisho-agent" status --config {config}'
    second = _install(upgrade, root, "--health-check", check)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "health check passed" in second.stdout
    assert _current(root) == "0.1.1" and _previous(root) == "0.1.0"
    version = subprocess.run(
        [str(venv / "bin" / "python"), "-I", "-c", "import importlib.metadata as m; print(m.version('sekisho'))"],
        capture_output=True,
        text=True,
    )
    assert version.stdout.strip() == "0.1.1"

    back = _install(good, root, "--rollback")
    assert back.returncode == 0, back.stderr
    assert _current(root) == "0.1.0" and _previous(root) == "0.1.1"
    assert "rolled back: current is now 0.1.0" in back.stdout

    # Switching to an installed release whose health check fails goes back by itself.
    missing = tmp_path / "no.toml"
    failing = _install(upgrade, root, "--health-check", f'"$SEKISHO_VENV/bin/sekisho-agent" status --config {missing}')
    assert failing.returncode == 1
    assert "failed its health check: rolled back to 0.1.0" in failing.stderr
    assert _current(root) == "0.1.0" and _previous(root) == "0.1.1"

    status = _install(good, root, "--status")
    assert "0.1.0 (current)" in status.stdout and "0.1.1 (previous)" in status.stdout


def test_a_release_that_cannot_start_is_refused_before_the_switch(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    good = agent_bundle(tmp_path_factory, "good")
    broken = agent_bundle(tmp_path_factory, "broken")
    root = tmp_path / "host"
    root.mkdir()
    assert _install(good, root).returncode == 0
    run = _install(broken, root)
    assert run.returncode == 1
    assert "release 0.1.2 refused before the switch; current stays 0.1.0" in run.stderr
    assert _current(root) == "0.1.0"
    assert not (root / "opt" / "sekisho" / "releases" / "0.1.2").exists()


def test_a_damaged_bundle_installs_nothing(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    copy = tmp_path / "bundle"
    shutil.copytree(agent_bundle(tmp_path_factory, "good"), copy)
    wheel = next((copy / "wheels").glob("paho_mqtt-*.whl"))
    data = bytearray(wheel.read_bytes())
    data[len(data) // 2] ^= 0xFF
    wheel.write_bytes(bytes(data))
    root = tmp_path / "host"
    root.mkdir()
    run = _install(copy, root)
    assert run.returncode == 1
    assert "SHA256SUMS does not match its files" in run.stderr
    assert not (root / "opt").exists()


def test_a_bundle_for_another_python_is_refused(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    copy = tmp_path / "bundle"
    shutil.copytree(agent_bundle(tmp_path_factory, "good"), copy)
    manifest = copy / "wheelhouse.json"
    manifest.write_text(manifest.read_text().replace('"python_tag": "cp311"', '"python_tag": "cp39"'))
    # Re-seal it, as a careless rebuild would: the check that catches it is the interpreter's, not the sums.
    sums = subprocess.run(
        "find . -type f ! -name SHA256SUMS | LC_ALL=C sort | sed 's|^./||' | xargs sha256sum",
        shell=True, cwd=copy, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    (copy / "SHA256SUMS").write_text(sums)
    root = tmp_path / "host"
    root.mkdir()
    run = _install(copy, root)
    assert run.returncode == 1 and "the bundle was built for cp39" in run.stderr
    assert not (root / "opt").exists()
