"""The PKI: what each certificate says, who signed it, and how private keys are stored."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from typer.testing import CliRunner

from sekisho.deploy.cli import app
from sekisho.deploy.pki import (
    AgentCredentials,
    PkiError,
    PkiPaths,
    init_ca,
    init_pki,
    issue_agent,
    issue_client_cert,
    issue_server_cert,
    load_cert,
    upgrade_pki,
)
from sekisho.protocol import signing


def _cn(cert: x509.Certificate) -> str:
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def _assert_issued_by(cert: x509.Certificate, ca: x509.Certificate) -> None:
    # Raises if the signature or the issuer name does not match.
    cert.verify_directly_issued_by(ca)


def _eku(cert: x509.Certificate) -> list[x509.ObjectIdentifier]:
    return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> PkiPaths:
    directory = tmp_path_factory.mktemp("pki-unit")
    paths = init_pki(directory, hosts=["broker.example.test", "10.0.0.5"])
    issue_agent(directory, "kiosk-01")
    return paths


def test_ca_is_a_self_signed_p256_ca(built: PkiPaths) -> None:
    ca = load_cert(built.ca_cert)
    _assert_issued_by(ca, ca)
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    assert ca.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]
    basic = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and basic.value.ca
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign
    lifetime = ca.not_valid_after_utc - ca.not_valid_before_utc
    assert lifetime.days >= 3650


def test_broker_cert_is_server_only_with_sans(built: PkiPaths) -> None:
    cert = load_cert(built.broker_cert)
    _assert_issued_by(cert, load_cert(built.ca_cert))
    assert _eku(cert) == [ExtendedKeyUsageOID.SERVER_AUTH]
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "broker.example.test"}
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
        ipaddress.ip_address("10.0.0.5"),
    }
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_controller_cert_is_client_with_cn_controller(built: PkiPaths) -> None:
    cert = load_cert(built.controller_cert)
    # From the controller CA, which the broker trusts on the controllers' listener only; never from the
    # site CA, which issues the agents' certificates.
    _assert_issued_by(cert, load_cert(built.controller_ca_cert))
    with pytest.raises(Exception):  # noqa: B017 - cryptography raises ValueError or InvalidSignature
        _assert_issued_by(cert, load_cert(built.ca_cert))
    assert _cn(cert) == "controller"
    assert _eku(cert) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    key = signing.load_private_key(built.controller_signing_key)
    assert signing.key_id(key.public_key()) == signing.key_id(signing.load_public_key(built.controller_signing_pub))


def test_agent_directory_is_self_contained(built: PkiPaths) -> None:
    agent = AgentCredentials.at(built.directory, "kiosk-01")
    cert = load_cert(agent.tls_cert)
    _assert_issued_by(cert, load_cert(agent.ca_cert))
    assert _cn(cert) == "kiosk-01"
    assert _eku(cert) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert agent.ca_cert.read_bytes() == built.ca_cert.read_bytes()
    assert agent.controller_signing_pub.read_bytes() == built.controller_signing_pub.read_bytes()
    # The agent's signing key signs what its public key verifies.
    key = signing.load_private_key(agent.signing_key)
    body = {"hello": "world"}
    signing.verify(signing.load_public_key(agent.signing_pub), "event", body, signing.sign(key, "event", body))
    # And its TLS key belongs to its certificate.
    tls_key = serialization.load_pem_private_key(agent.tls_key.read_bytes(), password=None)
    assert tls_key.public_key() == cert.public_key()


def test_controller_ca_is_a_separate_ca(built: PkiPaths) -> None:
    site, controller = load_cert(built.ca_cert), load_cert(built.controller_ca_cert)
    _assert_issued_by(controller, controller)
    assert controller.public_key() != site.public_key()
    assert controller.subject != site.subject
    assert controller.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_private_keys_are_0600_and_directories_0700(built: PkiPaths) -> None:
    agent = AgentCredentials.at(built.directory, "kiosk-01")
    for key in (
        built.ca_key,
        built.controller_ca_key,
        built.broker_key,
        built.controller_key,
        built.controller_signing_key,
        agent.tls_key,
        agent.signing_key,
    ):
        assert _mode(key) == 0o600, key
    for directory in (
        built.controller_cert.parent,
        built.controller_ca_cert.parent,
        built.broker_cert.parent,
        agent.directory,
    ):
        assert _mode(directory) == 0o700, directory
    assert not list(built.directory.rglob(".*.tmp")), "temporary files left behind"


def test_init_refuses_to_overwrite_ca(tmp_path: Path) -> None:
    paths = init_pki(tmp_path / "pki")
    before = paths.ca_cert.read_bytes()
    with pytest.raises(PkiError, match="refusing to overwrite"):
        init_pki(tmp_path / "pki")
    assert paths.ca_cert.read_bytes() == before
    init_pki(tmp_path / "pki", force=True)
    assert paths.ca_cert.read_bytes() != before
    assert _mode(paths.ca_key) == 0o600


def test_issue_agent_refuses_to_overwrite(tmp_path: Path) -> None:
    init_pki(tmp_path)
    first = issue_agent(tmp_path, "door-1")
    cert = first.tls_cert.read_bytes()
    with pytest.raises(PkiError, match="already exists"):
        issue_agent(tmp_path, "door-1")
    assert first.tls_cert.read_bytes() == cert
    again = issue_agent(tmp_path, "door-1", force=True)
    assert again.tls_cert.read_bytes() != cert


@pytest.mark.parametrize(
    "name",
    [
        *("", "Agent", "a/b", "a+b", "#", "../x", "a b", "-lead", "x" * 64, "controller", "sekisho-broker"),
        # An agent's name is its MQTT client id: these would collide with a controller's client ids.
        *("controller-1-ingest", "controller-1-policy", "controllerx"),
    ],
)
def test_bad_agent_names_are_refused(tmp_path: Path, name: str) -> None:
    init_pki(tmp_path)
    with pytest.raises(PkiError):
        issue_agent(tmp_path, name)
    assert list((tmp_path / "agents").iterdir()) == []


def test_issue_agent_needs_a_pki(tmp_path: Path) -> None:
    with pytest.raises(PkiError, match="run init"):
        issue_agent(tmp_path, "agent-x")


def test_bad_host_is_refused_before_writing(tmp_path: Path) -> None:
    with pytest.raises(PkiError, match="invalid host"):
        init_pki(tmp_path / "pki", hosts=["bad host"])
    assert not (tmp_path / "pki").exists()


def test_other_ca_does_not_vouch_for_our_names(tmp_path: Path) -> None:
    ours = init_pki(tmp_path / "ours")
    other = init_ca(tmp_path / "other")
    ident = issue_client_cert(other.directory, "agent-a", tmp_path / "rogue")
    rogue = load_cert(ident.cert)
    assert _cn(rogue) == "agent-a"
    _assert_issued_by(rogue, load_cert(other.cert))
    with pytest.raises(Exception):  # noqa: B017 - cryptography raises ValueError or InvalidSignature
        _assert_issued_by(rogue, load_cert(ours.ca_cert))


def test_cli_init_and_issue_agent(tmp_path: Path) -> None:
    runner = CliRunner()
    directory = tmp_path / "pki"
    result = runner.invoke(app, ["init", "--dir", str(directory), "--host", "mqtt.example.test"])
    assert result.exit_code == 0, result.output
    assert (directory / "ca.crt").exists()
    assert "-----BEGIN" not in result.output
    pub = signing.load_public_key(PkiPaths.at(directory).controller_signing_pub)
    assert signing.key_id(pub) in result.output

    result = runner.invoke(app, ["issue-agent", "reader-7", "--dir", str(directory)])
    assert result.exit_code == 0, result.output
    assert "-----BEGIN" not in result.output
    agent = AgentCredentials.at(directory, "reader-7")
    assert signing.key_id(signing.load_public_key(agent.signing_pub)) in result.output

    again = runner.invoke(app, ["issue-agent", "reader-7", "--dir", str(directory)])
    assert again.exit_code != 0
    assert "already exists" in again.output
    refused = runner.invoke(app, ["init", "--dir", str(directory)])
    assert refused.exit_code != 0
    bad = runner.invoke(app, ["issue-agent", "Bad/Name", "--dir", str(directory)])
    assert bad.exit_code != 0


def _old_layout_pki(directory: Path) -> PkiPaths:
    """A PKI as `pki init` made it before the controller CA: the site CA issued the controller's certificate."""
    paths = PkiPaths.at(directory)
    init_ca(directory)
    issue_server_cert(directory, [], paths.broker_cert.parent)
    issue_client_cert(directory, "controller", paths.controller_cert.parent)
    paths.controller_signing_key.write_bytes(signing.private_key_pem(signing.generate_key()))
    paths.controller_signing_key.chmod(0o600)
    paths.controller_signing_pub.write_bytes(
        signing.public_key_pem(signing.load_private_key(paths.controller_signing_key).public_key())
    )
    # An agent named before the prefix was reserved, written as the old issue-agent did.
    issue_client_cert(directory, "controller-door", directory / "agents" / "controller-door")
    return paths


def test_upgrade_adds_the_controller_ca_and_keeps_everything_else(tmp_path: Path) -> None:
    paths = _old_layout_pki(tmp_path / "pki")
    agent = issue_agent(paths.directory, "door-1")
    kept = {p: p.read_bytes() for p in (paths.ca_cert, paths.ca_key, paths.broker_cert, agent.tls_cert)}
    signing_key = paths.controller_signing_key.read_bytes()

    result = upgrade_pki(paths.directory)

    assert (result.created_controller_ca, result.reissued_controller_cert) == (True, True)
    assert result.reserved_agents == ("controller-door",)
    controller = load_cert(paths.controller_cert)
    _assert_issued_by(controller, load_cert(paths.controller_ca_cert))
    assert _cn(controller) == "controller"
    assert {p: p.read_bytes() for p in kept} == kept
    assert paths.controller_signing_key.read_bytes() == signing_key
    assert _mode(paths.controller_ca_key) == 0o600 and _mode(paths.controller_key) == 0o600

    before = {p: p.read_bytes() for p in (paths.controller_ca_cert, paths.controller_cert, paths.controller_key)}
    again = upgrade_pki(paths.directory)
    assert (again.created_controller_ca, again.reissued_controller_cert) == (False, False)
    assert {p: p.read_bytes() for p in before} == before


def test_upgrade_of_a_current_pki_changes_nothing(tmp_path: Path) -> None:
    paths = init_pki(tmp_path / "pki")
    before = {p: p.read_bytes() for p in paths.directory.rglob("*") if p.is_file()}
    result = upgrade_pki(paths.directory)
    assert (result.created_controller_ca, result.reissued_controller_cert, result.reserved_agents) == (
        False,
        False,
        (),
    )
    assert {p: p.read_bytes() for p in paths.directory.rglob("*") if p.is_file()} == before


def test_upgrade_needs_a_pki(tmp_path: Path) -> None:
    with pytest.raises(PkiError, match="run init"):
        upgrade_pki(tmp_path)


def test_cli_upgrade(tmp_path: Path) -> None:
    paths = _old_layout_pki(tmp_path / "pki")
    runner = CliRunner()
    result = runner.invoke(app, ["upgrade", "--dir", str(paths.directory)])
    assert result.exit_code == 0, result.output
    assert str(paths.controller_ca_cert) in result.output.replace("\n", "")
    assert "controller-door" in result.output
    assert "-----BEGIN" not in result.output
    again = runner.invoke(app, ["upgrade", "--dir", str(paths.directory)])
    assert again.exit_code == 0 and "up to date" in again.output
    refused = runner.invoke(app, ["issue-agent", "controller-2", "--dir", str(paths.directory)])
    assert refused.exit_code != 0 and "reserved" in refused.output
