"""The [alerts] section of controller.toml and the policy's alerts section, as docs/alerts.md shows them.

The examples in the documentation are the ones parsed here, so a change of name or shape breaks this test
before it misleads an administrator; relative secret paths resolve against the config file's directory.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from sekisho.controller.config import load_config
from sekisho.controller.policy.loader import PolicyError, parse_policy
from sekisho.lab import write_toml

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "alerts.md").read_text(encoding="utf-8")
DEMO = (ROOT / "deploy" / "demo" / "site.yaml").read_text(encoding="utf-8")


def _block(kind: str) -> str:
    found = re.search(rf"```{kind}\n(.*?)```", DOC, re.S)
    assert found is not None, f"docs/alerts.md has no {kind} example"
    return found.group(1)


def _without_alerts(site: str) -> str:
    return re.sub(r"\n# Alerts \(docs/alerts.md\).*?\n(?=login:)", "\n", site, flags=re.S)


def test_the_documented_policy_section_is_valid() -> None:
    policy = parse_policy(_without_alerts(DEMO) + "\n" + _block("yaml"))
    alerts = policy.alerts
    assert [c.id for c in alerts.contacts] == ["guard-desk", "night-guard", "sec-lead", "soc"]
    assert alerts.escalations[0].steps[0].notify == ["roster:duty"]
    assert alerts.rules["usb_blocked"].enabled is False
    # Never in an agent's slice: contacts and escalation are the controller's business.
    assert "alerts" not in policy.for_agent("door-hr-01")


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ("notify: [sec-lead, soc]", "notify: [sec-lead, nobody]"),
        ("hours: s-office", "hours: s-never"),
        ("door_forced: {severity: critical}", "door_kicked: {severity: critical}"),
    ],
)
def test_a_wrong_reference_in_the_alerts_section_is_refused(change: str, problem: str) -> None:
    text = _block("yaml").replace(change, problem)
    with pytest.raises(PolicyError):
        parse_policy(_without_alerts(DEMO) + "\n" + text)


def test_the_documented_controller_section_loads_with_paths_resolved(tmp_path: Path) -> None:
    base = (ROOT / "deploy" / "demo").resolve()
    head: dict[str, object] = {
        "ca_cert": str(base / "ca.pem"),
        "tls_cert": str(base / "c.pem"),
        "tls_key": str(base / "c.key"),
        "signing_key": str(base / "s.key"),
    }
    config_path = tmp_path / "controller.toml"
    write_toml(config_path, head)
    config_path.write_text(config_path.read_text() + _block("toml"), encoding="utf-8")
    config = load_config(config_path)
    alerts = config.alerts
    assert alerts.smtp is not None and alerts.smtp.password_file == (tmp_path / "secrets" / "smtp-password")
    assert alerts.webhooks["soc"].secret_file == tmp_path / "secrets" / "soc-webhook-key"
    assert alerts.syslog is not None and alerts.syslog.transport == "tcp"
    assert "hooks/sekisho" not in repr(alerts.webhooks["soc"])  # a URL with a token stays out of logs


def test_an_unknown_key_in_the_alerts_section_is_refused(tmp_path: Path) -> None:
    config_path = tmp_path / "controller.toml"
    write_toml(
        config_path,
        {"ca_cert": "a", "tls_cert": "b", "tls_key": "c", "signing_key": "d", "alerts": {"smpt": {"host": "x"}}},
    )
    with pytest.raises(ValueError, match="smpt"):
        load_config(config_path)
