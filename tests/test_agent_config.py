"""Agent configuration and CLI start-up: typed, frozen, fail closed, and a clear message on every mistake."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from sekisho.agents.runtime.config import AgentConfig, load_config
from sekisho.agents.runtime.errors import ConfigError
from sekisho.protocol import signing

ROOT = Path(__file__).resolve().parent.parent
KEYS = ("ca.crt", "tls.crt", "tls.key", "signing.key", "controller-signing.pub")


def write(directory: Path, body: str, *, make_keys: bool = True) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    if make_keys:
        for name in KEYS:
            (directory / name).write_bytes(b"placeholder")
        key = signing.generate_key()
        (directory / "signing.key").write_bytes(signing.private_key_pem(key))
        (directory / "controller-signing.pub").write_bytes(signing.public_key_pem(key.public_key()))
    path = directory / "agent.toml"
    path.write_text(body)
    return path


BASE = """
agent_id = "term-001"
ca_cert = "ca.crt"
tls_cert = "tls.crt"
tls_key = "tls.key"
signing_key = "signing.key"
controller_public_key = "controller-signing.pub"
state_dir = "state"
"""


def test_relative_paths_resolve_against_the_toml_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path / "etc", BASE)
    monkeypatch.chdir("/")
    config = load_config(path)
    assert config.tls_key == tmp_path / "etc" / "tls.key"
    assert config.state_dir == tmp_path / "etc" / "state"
    assert (config.broker_host, config.broker_port, config.outbox_sync, config.max_inflight) == (
        "127.0.0.1",
        8883,
        "full",
        1000,
    )
    assert config.session_expiry_s == 7 * 24 * 3600


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, BASE + "broker_port = 1884\n")
    monkeypatch.setenv("SEKISHO_AGENT_BROKER_PORT", "18883")
    monkeypatch.setenv("SEKISHO_AGENT_STATE_DIR", "elsewhere")
    config = load_config(path)
    assert config.broker_port == 18883
    assert config.state_dir == tmp_path / "elsewhere"


def test_config_is_frozen(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, BASE))
    with pytest.raises(ValidationError):
        config.broker_port = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ('brokr_host = "x"\n', "brokr_host"),
        ("max_inflight = 0\n", "max_inflight"),
        ('outbox_sync = "off"\n', "outbox_sync"),
        ("reconnect_min_s = 10\nreconnect_max_s = 1\n", "reconnect_min_s"),
    ],
)
def test_invalid_settings_are_refused_with_the_field_named(tmp_path: Path, extra: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, BASE + extra))


def test_invalid_agent_id_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="agent_id"):
        load_config(write(tmp_path, BASE.replace("term-001", "Term 001")))


def test_missing_key_file_fails_closed(tmp_path: Path) -> None:
    path = write(tmp_path, BASE)
    (tmp_path / "tls.key").unlink()
    with pytest.raises(ConfigError, match=r"tls_key .* does not exist"):
        load_config(path)


def test_missing_or_broken_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "agent_id = "))


def test_direct_construction_validates_too(tmp_path: Path) -> None:
    with pytest.raises(ValidationError):
        AgentConfig(agent_id="x", ca_cert=tmp_path, unknown=1)  # type: ignore[call-arg]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from sekisho.agents.runtime.cli import app; app()", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def test_cli_run_with_missing_key_exits_non_zero_with_a_clear_message(tmp_path: Path) -> None:
    path = write(tmp_path, BASE)
    (tmp_path / "signing.key").unlink()
    proc = run_cli("run", "--config", str(path))
    assert proc.returncode == os.EX_CONFIG
    assert "signing_key" in proc.stderr and "does not exist" in proc.stderr
    assert not (tmp_path / "state").exists()


def test_cli_run_with_a_non_key_signing_key_exits_non_zero(tmp_path: Path) -> None:
    path = write(tmp_path, BASE)
    (tmp_path / "signing.key").write_text("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    proc = run_cli("run", "--config", str(path))
    assert proc.returncode == os.EX_CONFIG
    assert "is not an Ed25519 private key" in proc.stderr
    assert "AAAA" not in proc.stderr  # never echo key material


def test_cli_run_with_garbage_certificate_exits_non_zero(tmp_path: Path) -> None:
    path = write(tmp_path, BASE)
    proc = run_cli("run", "--config", str(path))  # ca.crt, tls.crt and tls.key are placeholders
    assert proc.returncode == os.EX_CONFIG
    assert "TLS files unusable" in proc.stderr
    assert not (tmp_path / "state").exists()


def test_cli_status_before_and_after_outbox(tmp_path: Path) -> None:
    path = write(tmp_path, BASE)
    proc = run_cli("status", "--config", str(path))
    assert proc.returncode == 0, proc.stderr
    assert "not created yet" in proc.stdout and "none" in proc.stdout


def test_cli_damaged_outbox_exits_non_zero(tmp_path: Path) -> None:
    path = write(tmp_path, BASE)
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "outbox.sqlite3").write_bytes(b"garbage" * 1000)
    proc = run_cli("status", "--config", str(path))
    assert proc.returncode == os.EX_IOERR
    assert "damaged" in proc.stderr


def test_example_config_is_valid() -> None:
    config = load_config(ROOT / "agents" / "runtime" / "agent.toml.example", check_files=False)
    assert config.agent_id == "term-001" and config.outbox_sync == "full"
