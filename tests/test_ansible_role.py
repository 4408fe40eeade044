"""The rollout role (deploy/ansible/roles/sekisho_agent) applied with ansible-playbook to a temporary root."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from support.bundles import agent_bundle

from sekisho.agents.runtime.config import load_config
from sekisho.deploy.pki import AgentCredentials

ROOT = Path(__file__).resolve().parent.parent
ANSIBLE = ROOT / "deploy" / "ansible"
PLAYBOOK = Path(sys.executable).parent / "ansible-playbook"
HOST_PYTHON = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable

pytestmark = pytest.mark.skipif(not PLAYBOOK.exists(), reason="ansible-playbook is not in the venv (dev lock)")

# The play a test runs: the role, then the enrolment command it prepared written out for the test to read.
PLAY = """
- hosts: all
  gather_facts: false
  roles:
    - sekisho_agent
  post_tasks:
    - name: Keep the enrolment command for the test
      ansible.builtin.copy:
        content: "{{ sekisho_enrol_argv | default([]) | to_json }}"
        dest: "{{ test_argv_file }}"
        mode: "0600"
"""


def _play(tmp_path: Path, variables: dict[str, Any], *, name: str) -> subprocess.CompletedProcess[str]:
    playbook = tmp_path / "play.yml"
    playbook.write_text(PLAY)
    extra = tmp_path / f"{name}-vars.json"
    extra.write_text(json.dumps({**variables, "test_argv_file": str(tmp_path / "argv.json")}))
    home = tmp_path / "ansible-home"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")},
        "ANSIBLE_ROLES_PATH": str(ANSIBLE / "roles"),
        "ANSIBLE_HOME": str(home),
        "ANSIBLE_LOCAL_TEMP": str(home / "tmp"),
        "ANSIBLE_REMOTE_TEMP": str(home / "remote-tmp"),
        "ANSIBLE_PYTHON_INTERPRETER": sys.executable,
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_RETRY_FILES_ENABLED": "0",
        "PYTHONWARNINGS": "ignore",
    }
    return subprocess.run(
        [str(PLAYBOOK), "-v", "-i", "localhost,", "-c", "local", str(playbook), "-e", f"@{extra}"],
        capture_output=True,
        text=True,
        timeout=1200,
        env=env,
        cwd=tmp_path,
    )


def _recap(run: subprocess.CompletedProcess[str]) -> dict[str, int]:
    match = re.search(r"localhost\s*:\s*(ok=\d+.*)", run.stdout)
    assert match, run.stdout + run.stderr
    return {key: int(value) for key, value in re.findall(r"(\w+)=(\d+)", match.group(1))}


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


@pytest.fixture
def terminal_vars(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, pki: Path) -> dict[str, Any]:
    """Role variables for a terminal with credentials issued on the PKI host, into a temporary root."""
    bundle = agent_bundle(tmp_path_factory, "good")
    host = tmp_path / "host"
    host.mkdir()
    return {
        "sekisho_root": str(host),
        "sekisho_bundle": str(bundle.parent / f"{bundle.name}.tar.gz"),
        "sekisho_role": "terminal",
        "sekisho_terminal_id": "t-hr-01",
        "sekisho_python": HOST_PYTHON,
        "sekisho_credentials_src": str(AgentCredentials.at(pki, "agent-a").tls_cert.parent),
        "sekisho_agent_id": "agent-a",
        "sekisho_broker_host": "mqtt.example.internal",
        "sekisho_create_users": False,
        "sekisho_manage_services": False,
        # The staging root has no systemd to restart the unit in: the check runs the new release's agent instead.
        "sekisho_health_check": '"$SEKISHO_VENV/bin/sekisho-agent" --help',
    }


def test_the_role_installs_a_terminal_into_a_root_and_a_second_run_changes_nothing(
    terminal_vars: dict[str, Any], tmp_path: Path
) -> None:
    host = Path(terminal_vars["sekisho_root"])
    outside = [Path("/opt/sekisho"), Path("/etc/sekisho"), Path("/etc/systemd/system/sekisho-terminal.service")]
    before = {path: path.exists() for path in outside}
    first = _play(tmp_path, terminal_vars, name="first")
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-2000:]
    recap = _recap(first)
    assert recap["failed"] == 0 and recap["changed"] > 0
    enrol = first.stdout.split("TASK [sekisho_agent : Enrol this device with the controller]")[1]
    assert enrol.lstrip("* \n").startswith("skipping: [localhost]")  # enrolment is off
    assert json.loads((tmp_path / "argv.json").read_text()) == []

    opt = host / "opt" / "sekisho"
    assert (opt / "current").readlink() == Path("releases/0.1.0")
    assert (opt / "current" / "venv" / "bin" / "sekisho-agent").is_file()
    agent_dir = host / "etc" / "sekisho" / "agent"
    assert _mode(agent_dir) == 0o700
    for name, mode in {"agent.toml": 0o600, "tls.key": 0o600, "signing.key": 0o600, "tls.crt": 0o644}.items():
        assert _mode(agent_dir / name) == mode, name
    config = load_config(agent_dir / "agent.toml")
    assert config.agent_id == "agent-a" and config.broker_host == "mqtt.example.internal"
    assert (host / "etc" / "sekisho" / "terminal.env").read_text().splitlines()[2] == "SEKISHO_TERMINAL=t-hr-01"
    units = host / "etc" / "systemd" / "system"
    for unit in ("sekisho-terminal.service", "sekisho-doors.service", "sekisho-controller.service"):
        assert (units / unit).read_bytes() == (ROOT / "deploy" / "systemd" / unit).read_bytes()
        assert _mode(units / unit) == 0o644
    assert (host / "usr" / "lib" / "sysusers.d" / "sekisho.conf").is_file()
    # Nothing left the temporary root: no unit, release or config of this machine appeared.
    assert {path: path.exists() for path in outside} == before

    second = _play(tmp_path, terminal_vars, name="second")
    assert second.returncode == 0, second.stdout[-4000:]
    assert _recap(second)["changed"] == 0, second.stdout[-4000:]


def test_enrolment_runs_the_agent_enrol_command_with_the_token_out_of_sight(
    terminal_vars: dict[str, Any], tmp_path: Path
) -> None:
    host = Path(terminal_vars["sekisho_root"])
    token = "sekisho-test-token-not-a-real-one"
    variables = {
        **terminal_vars,
        "sekisho_enrol": True,
        "sekisho_enrol_token": token,
        "sekisho_controller_url": "https://127.0.0.1:9",
        "sekisho_agent_name": "term-hr-01",
        "sekisho_credentials_src": "",
        "sekisho_agent_id": "",
    }
    run = _play(tmp_path, variables, name="enrol")
    argv = host / "etc" / "sekisho" / "agent"
    venv = f"{host}/opt/sekisho/current/venv"
    # The command prepared is the real one, on the installed release's agent:
    prepared = re.search(r'"sekisho_enrol_argv": (\[[^\]]*\])', run.stdout.replace("\n", " "))
    expected = [
        f"{venv}/bin/sekisho-agent", "enrol", "--kind", "terminal", "--dir", str(argv),
        "--controller", "https://127.0.0.1:9", "--name", "term-hr-01",
    ]  # fmt: skip
    assert prepared is not None, run.stdout[-4000:]
    assert json.loads(prepared.group(1)) == expected
    # It ran (a made-up token cannot enrol): the play stops there, nothing half-enrolled is left, and the
    # token appears nowhere in the output.
    assert run.returncode != 0
    assert "TASK [sekisho_agent : Enrol this device with the controller]" in run.stdout
    after = (run.stdout + run.stderr).split("Enrol this device with the controller]")[1]
    assert "non-zero return code" in after and "Enable and start" not in after
    assert token not in run.stdout + run.stderr
    assert not (argv / "agent.toml").exists()
    assert (host / "opt" / "sekisho" / "current").is_symlink()
    ran = subprocess.run(
        [*expected, "--help"], capture_output=True, text=True, timeout=120, env={**os.environ, "SEKISHO_TOKEN": token}
    )
    assert ran.returncode == 0 and "--token" in ran.stdout, ran.stderr
