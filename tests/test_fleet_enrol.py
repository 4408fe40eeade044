"""Enrolment with one-time tokens and self-renewing certificates (issue 11, items 1-2), end to end.

A real site: mosquitto with mutual TLS and the agents' ACL, the controller ingesting, and its API served
over HTTPS by uvicorn on a free loopback port. Devices enrol as `sekisho-agent enrol` does (keys made on
the device, CA pinned by the token's fingerprint), then connect to the broker with a certificate issued
by the issuing sub-CA (leaf + chain), and their signed events are stored.
"""

from __future__ import annotations

import os
import socket
import ssl
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from sqlalchemy import func, select
from support.lab import lab_on
from support.mqtt import ConnectRefused, TlsFiles, connect_client
from support.site import wait_for

from sekisho.agents.runtime.agent import Agent
from sekisho.agents.runtime.cert_renewal import CertificateRenewer
from sekisho.agents.runtime.config import load_config
from sekisho.agents.runtime.enrol_client import EnrolError, EnrolRefusedError, enrol
from sekisho.controller.config import load_config as load_controller_config
from sekisho.controller.fleet.enrol_service import EnrolmentService
from sekisho.controller.service import Controller
from sekisho.controller.store.models import Event
from sekisho.deploy.pki import api_identity, load_cert
from sekisho.lab import Lab
from sekisho.lab.fleet import enrol_fleet, enrolment_settings, https_api
from sekisho.protocol import enrolment, timefmt
from sekisho.protocol.revocations import parse_broker_text, serial_text

WAIT = 20.0


class ShiftedClock:
    """The controller's and the devices' clock: real time moved by an offset the test sets."""

    def __init__(self) -> None:
        self.offset = timedelta(0)

    def __call__(self) -> datetime:
        return timefmt.now() + self.offset


@dataclass
class EnrolSite:
    """A running site with the HTTPS API, and the service behind it (same clock)."""

    lab: Lab
    ctl: Controller
    url: str
    clock: ShiftedClock
    service: EnrolmentService

    def token(self, kind: str = "terminal", **options: object) -> str:
        """Make a token the way `sekisho fleet token create` does."""
        options.setdefault("expires_in", timedelta(hours=1))
        return self.service.create_token(kind=kind, created_by="test", controller_url=self.url, **options).token  # type: ignore[arg-type]

    def refusals(self) -> list[tuple[str, str | None]]:
        """Return (reason, name) of every recorded refusal, oldest first."""
        return [(r.reason, r.name) for r in reversed(self.ctl.store.list_refusals(1000))]

    def stored_events(self, agent: str) -> int:
        """Return how many events of an agent are stored."""
        with self.ctl.store.engine.connect() as conn:
            return int(
                conn.execute(select(func.count()).select_from(Event).where(Event.agent_id == agent)).scalar_one()
            )


@pytest.fixture
def site(pki: Path, tmp_path: Path) -> Iterator[EnrolSite]:
    """A lab site with enrolment configured (issuing sub-CA) and the API over HTTPS."""
    lab = lab_on(pki, tmp_path / "site")
    lab.start_broker()
    lab.write_controller_config(batch_wait_ms=5, **enrolment_settings(lab, sub_ca=True))
    config = load_controller_config(lab.controller_config)
    ctl = Controller(config)
    ctl.start()
    clock = ShiftedClock()
    try:
        with https_api(config, ctl.store, clock=clock) as url:
            yield EnrolSite(lab, ctl, url, clock, EnrolmentService(config, ctl.store, clock=clock))
    finally:
        ctl.stop()
        lab.stop_all()


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _agent_overrides(path: Path) -> None:
    # Quick reconnects keep the broker-restart step short; the rest is as enrol wrote it.
    with path.open("a") as handle:
        handle.write("reconnect_min_s = 0.1\nreconnect_max_s = 1\nresend_after_s = 2\n")


def test_enrol_end_to_end_over_https_and_the_real_broker(site: EnrolSite, tmp_path: Path) -> None:
    # The administrator's side: the CLI, as documented.
    made = site.lab.sekisho(
        "fleet", "token", "create", "--config", str(site.lab.controller_config), "--kind", "terminal",
        "--expires", "24h", "--uses", "1", "--name", "term-e2e", "--url", site.url,
    )  # fmt: skip
    token = made.stdout.strip().splitlines()[-1]
    assert token.startswith("sek1.")
    listed = site.lab.sekisho("fleet", "token", "list", "--config", str(site.lab.controller_config)).stdout
    assert "term-e2e" in listed and "usable" in listed and token.split(".")[1] not in listed

    # The device's side: `sekisho-agent enrol`, with the controller URL taken from the token.
    device = tmp_path / "device"
    enrolled = subprocess.run(
        [sys.executable, "-m", "sekisho", "agent", "enrol", "--token", token, "--kind", "terminal",
         "--dir", str(device)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert enrolled.returncode == 0, enrolled.stderr
    assert "term-e2e" in enrolled.stdout

    # Keys were made on the device and kept private; the chain is leaf + issuing sub-CA.
    assert _mode(device) == 0o700
    for private in ("tls.pem", "signing.key"):
        assert _mode(device / private) == 0o600
    chain = x509.load_pem_x509_certificates((device / "tls.pem").read_bytes())
    issuing = load_cert(site.lab.pki_dir / "issuing-ca" / "ca.crt")
    assert [c.subject for c in chain[1:]] == [issuing.subject]
    assert chain[0].subject.rfc4514_string() == "CN=term-e2e,O=sekisho"
    lifetime = chain[0].not_valid_after_utc - chain[0].not_valid_before_utc
    assert timedelta(days=29) < lifetime <= timedelta(days=30, minutes=10)

    # Registered through the registration path: a controller-signed key line, the device noted.
    lines = site.ctl.store.key_history("term-e2e")
    assert [line.action for line in lines] == ["register"] and lines[0].signature
    assert site.ctl.store.device("term-e2e").kind == "terminal"  # type: ignore[union-attr]
    assert "used" in site.lab.sekisho("fleet", "token", "list", "--config", str(site.lab.controller_config)).stdout

    # The enrolled agent connects to mosquitto (mTLS with the chain, ACL) and its signed events are stored.
    _agent_overrides(device / "agent.toml")
    agent = Agent(load_config(device / "agent.toml"))
    agent.start()
    try:
        assert agent.link.wait_connected(WAIT)
        agent.emit("test.synthetic", {"n": 1, "note": "enrolled"})
        wait_for(lambda: site.stored_events("term-e2e") >= 2, WAIT, "the enrolled agent's events to be stored")
    finally:
        agent.stop()


def test_sub_ca_leaf_needs_its_chain_at_the_broker(site: EnrolSite, tmp_path: Path) -> None:
    done = enrol(site.token(), tmp_path / "d", kind="terminal", name="term-chain", machine_id="m-chain")
    pem = (tmp_path / "d" / "tls.pem").read_bytes()
    ca = site.lab.pki.ca_cert
    with_chain = connect_client(TlsFiles(ca, done.directory / "tls.pem", done.directory / "tls.pem"),
                                site.lab.broker.port, "term-chain")  # fmt: skip
    with_chain.disconnect()
    # The same leaf without the sub-CA after it: the broker (trusting the site CA only) cannot build a path.
    leaf_only = tmp_path / "leaf.pem"
    certs = x509.load_pem_x509_certificates(pem)
    key_part = pem[: pem.index(b"-----BEGIN CERTIFICATE-----")]
    leaf_only.write_bytes(key_part + certs[0].public_bytes(Encoding.PEM))
    leaf_only.chmod(0o600)
    with pytest.raises(ConnectRefused):
        connect_client(TlsFiles(ca, leaf_only, leaf_only), site.lab.broker.port, "term-chain")


def test_refusals_are_clear_and_recorded(site: EnrolSite, tmp_path: Path) -> None:
    one_use = site.token(name="term-r1")
    enrol(one_use, tmp_path / "r1", kind="terminal", machine_id="m-r1")

    with pytest.raises(EnrolRefusedError) as reused:
        enrol(one_use, tmp_path / "again", kind="terminal", machine_id="m-again")
    assert reused.value.reason == "token_used"

    with pytest.raises(EnrolRefusedError) as wrong_kind:
        enrol(site.token("door"), tmp_path / "wk", kind="terminal", name="term-wk", machine_id="m-wk")
    assert wrong_kind.value.reason == "wrong_kind" and "door" in str(wrong_kind.value)

    short = site.token(expires_in=timedelta(minutes=5))
    site.clock.offset = timedelta(minutes=6)
    with pytest.raises(EnrolRefusedError) as expired:
        enrol(short, tmp_path / "ex", kind="terminal", name="term-ex", machine_id="m-ex", clock=site.clock)
    assert expired.value.reason == "token_expired"
    site.clock.offset = timedelta(0)

    unknown = enrolment.parse_token(one_use).model_copy(update={"secret": b"\x01" * 32}).encode()
    with pytest.raises(EnrolRefusedError) as guessed:
        enrol(unknown, tmp_path / "un", kind="terminal", name="term-un", machine_id="m-un")
    assert guessed.value.reason == "unknown_token"

    # A cloned disk (same machine-id) under another name, and a second device taking a name in use.
    with pytest.raises(EnrolRefusedError) as clone:
        enrol(site.token(), tmp_path / "clone", kind="terminal", name="term-clone", machine_id="m-r1")
    assert clone.value.reason == "clone" and "term-r1" in str(clone.value)
    with pytest.raises(EnrolRefusedError) as duplicate:
        enrol(site.token(), tmp_path / "dup", kind="terminal", name="term-r1", machine_id="m-dup")
    assert duplicate.value.reason == "duplicate_name" and "--reenrol term-r1" in str(duplicate.value)

    # A revoked token.
    revoked = site.service.create_token(
        kind="terminal", expires_in=timedelta(hours=1), created_by="t", controller_url=site.url
    )
    assert site.ctl.store.revoke_token(revoked.row.id, timefmt.now())
    with pytest.raises(EnrolRefusedError) as withdrawn:
        enrol(revoked.token, tmp_path / "rv", kind="terminal", name="term-rv", machine_id="m-rv")
    assert withdrawn.value.reason == "token_revoked"

    assert site.refusals() == [
        ("token_used", None),
        ("wrong_kind", "term-wk"),
        ("token_expired", "term-ex"),
        ("unknown_token", "term-un"),
        ("clone", "term-clone"),
        ("duplicate_name", "term-r1"),
        ("token_revoked", "term-rv"),
    ]
    shown = site.lab.sekisho("fleet", "refusals", "--config", str(site.lab.controller_config)).stdout
    assert "clone" in shown and "duplicate_name" in shown
    # None of them got in.
    assert {a.id for a in site.ctl.store.list_agents()} == {"term-r1"}


def test_a_ca_that_does_not_match_the_token_is_refused_before_anything_is_sent(site: EnrolSite, tmp_path: Path) -> None:
    good = enrolment.parse_token(site.token(name="term-pin"))
    forged = good.model_copy(update={"ca_sha256": bytes(32)}).encode()
    with pytest.raises(EnrolError, match="does not match the enrolment token"):
        enrol(forged, tmp_path / "pin", kind="terminal", machine_id="m-pin")
    assert not (tmp_path / "pin").exists()  # no keys made, nothing sent
    assert site.refusals() == []
    # The token itself is untouched and still works.
    enrol(good.encode(), tmp_path / "pin", kind="terminal", machine_id="m-pin")


def test_one_use_token_presented_twice_at_once_enrols_one_device(site: EnrolSite, tmp_path: Path) -> None:
    token = site.token()
    results: dict[str, object] = {}
    start = threading.Barrier(2)

    def device(name: str) -> None:
        start.wait()
        try:
            results[name] = enrol(token, tmp_path / name, kind="terminal", name=name, machine_id=f"m-{name}")
        except EnrolRefusedError as err:
            results[name] = err.reason

    threads = [threading.Thread(target=device, args=(n,)) for n in ("race-a", "race-b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert sorted(str(type(v).__name__) if not isinstance(v, str) else v for v in results.values()) == [
        "Enrolled",
        "token_used",
    ]
    assert len(site.ctl.store.list_agents()) == 1


def test_reenrol_replaces_the_agent_and_keeps_its_key_history(site: EnrolSite, tmp_path: Path) -> None:
    old = enrol(site.token(name="term-swap"), tmp_path / "old", kind="terminal", machine_id="m-old")
    made = site.lab.sekisho(
        "fleet", "token", "create", "--config", str(site.lab.controller_config), "--kind", "terminal",
        "--reenrol", "term-swap", "--url", site.url,
    )  # fmt: skip
    old_files = TlsFiles(site.lab.pki.ca_cert, old.directory / "tls.pem", old.directory / "tls.pem")
    connect_client(old_files, site.lab.broker.port, "term-swap").disconnect()
    new = enrol(made.stdout.strip().splitlines()[-1], tmp_path / "new", kind="terminal", machine_id="m-new")
    assert new.agent_id == old.agent_id == "term-swap"
    history = site.ctl.store.key_history("term-swap")
    assert [line.action for line in history] == ["register", "replace"]
    # The old device's outbox is still accepted for the configured grace window (signed into the line).
    assert history[-1].previous_until is not None
    assert history[-1].previous_until - history[-1].valid_from == timedelta(
        seconds=site.ctl.config.key_rotation_grace_s
    )
    # Its certificate is refused by the broker at once (by serial), while the new device's connects.
    old_serial = x509.load_pem_x509_certificates((old.directory / "tls.pem").read_bytes())[0].serial_number
    assert site.ctl.config.revocation_list is not None
    listed = parse_broker_text(site.ctl.config.revocation_list.read_text())
    assert listed.serials.get(serial_text(old_serial)) == "term-swap" and "term-swap" not in listed.names
    site.lab.broker.reload()
    with pytest.raises(ConnectRefused):
        connect_client(old_files, site.lab.broker.port, "term-swap")
    new_files = TlsFiles(site.lab.pki.ca_cert, new.directory / "tls.pem", new.directory / "tls.pem")
    connect_client(new_files, site.lab.broker.port, "term-swap").disconnect()
    # The old device's key was retired: it can no longer renew its certificate.
    with pytest.raises(EnrolRefusedError) as refused:
        CertificateRenewer(load_config(old.config_path)).renew_now()
    assert refused.value.reason == "bad_signature"
    CertificateRenewer(load_config(new.config_path)).renew_now()


def _presented_certificate(ctx: ssl.SSLContext, server_cert: Path, server_key: Path, ca: Path) -> bytes:
    """Return the client certificate a TLS client context presents, as a TLS server sees it (DER)."""
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(server_cert, server_key)
    server.verify_mode = ssl.CERT_REQUIRED
    server.load_verify_locations(ca)
    seen: list[bytes] = []
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(WAIT)

        def accept() -> None:
            conn, _ = listener.accept()
            with server.wrap_socket(conn, server_side=True) as tls:
                seen.append(tls.getpeercert(binary_form=True) or b"")

        thread = threading.Thread(target=accept)
        thread.start()
        with (
            socket.create_connection(listener.getsockname(), timeout=WAIT) as raw,
            ctx.wrap_socket(raw, server_hostname="localhost"),
        ):
            # Open until the server has seen the whole handshake (TLS 1.3 sends the client's certificate last).
            thread.join(WAIT)
    return seen[0]


def test_renewal_before_expiry_with_a_controlled_clock(site: EnrolSite, tmp_path: Path) -> None:
    # Enrolled 21 days ago (controller and device clocks both moved back), 30-day certificate.
    site.clock.offset = -timedelta(days=21)
    done = enrol(
        site.token(name="term-renew"), tmp_path / "dev", kind="terminal", machine_id="m-renew", clock=site.clock
    )
    _agent_overrides(done.config_path)
    config = load_config(done.config_path)
    first = x509.load_pem_x509_certificates(config.tls_cert.read_bytes())[0]
    enrolled_at = timefmt.now() - timedelta(days=21)

    # A day after enrolment nothing is due; the due time lies before two thirds of the lifetime.
    early = CertificateRenewer(config, clock=lambda: enrolled_at + timedelta(days=1))
    assert not early.renew_if_due()
    lifetime = first.not_valid_after_utc - first.not_valid_before_utc
    # Two thirds of the lifetime, up to a tenth of it earlier at random (the jitter spreads a fleet's renewals).
    assert first.not_valid_before_utc + lifetime * (2 / 3 - 0.1) - timedelta(seconds=1) <= early.due_at()
    assert early.due_at() <= first.not_valid_before_utc + lifetime * 2 / 3

    # Today (day 21 of 30) it is due: the running agent renews on its own, over HTTPS, with a new key.
    site.clock.offset = timedelta(0)
    agent = Agent(config)
    agent.start()
    try:
        assert agent.link.wait_connected(WAIT)
        assert agent.renewer is not None
        wait_for(lambda: agent.renewer.renewed == 1, WAIT, "the certificate to be renewed")  # type: ignore[union-attr]
        second = x509.load_pem_x509_certificates(config.tls_cert.read_bytes())
        assert second[0].serial_number != first.serial_number
        assert second[0].public_key() != first.public_key()
        assert second[0].not_valid_after_utc > first.not_valid_after_utc + timedelta(days=20)
        assert _mode(config.tls_cert) == 0o600
        assert [c.via for c in site.ctl.store.certificates("term-renew")] == ["enrol", "renew"]

        # The link's TLS context now presents the new certificate on its next connection...
        api = api_identity(site.lab.pki_dir)
        presented = _presented_certificate(agent.link.tls, api.cert, api.key, site.lab.pki.ca_cert)
        assert presented == second[0].public_bytes(Encoding.DER)
        # ...and after a broker restart the agent is back with it, its events stored.
        site.lab.broker.restart()
        before = site.stored_events("term-renew")
        agent.emit("test.synthetic", {"n": 2, "note": "renewed"})
        wait_for(lambda: site.stored_events("term-renew") > before, WAIT, "an event sent with the renewed certificate")
    finally:
        agent.stop()


def test_offline_past_expiry_must_re_enrol(site: EnrolSite, tmp_path: Path) -> None:
    site.clock.offset = -timedelta(days=31)
    done = enrol(
        site.token(name="term-late"), tmp_path / "late", kind="terminal", machine_id="m-late", clock=site.clock
    )
    site.clock.offset = timedelta(0)
    renewer = CertificateRenewer(load_config(done.config_path))
    with pytest.raises(EnrolError, match="--reenrol term-late"):
        renewer.renew_now()
    # The documented recovery: a re-enrolment token for the same name, used on the same device.
    again = enrol(site.token(name="term-late", reenrol=True), tmp_path / "late", kind="terminal",
                  machine_id="m-late", force=True)  # fmt: skip
    assert again.not_after > timefmt.now() + timedelta(days=29)


def test_enrol_many_agents_with_the_lab_function(site: EnrolSite, tmp_path: Path) -> None:
    run = enrol_fleet(site.service, site.url, tmp_path / "fleet", 6, workers=3)
    assert sorted(a.agent_id for a in run.agents) == [f"bench-{i:04d}" for i in range(1, 7)]
    assert run.seconds > 0
    assert all(os.path.exists(a.config_path) for a in run.agents)
    assert len(site.ctl.store.list_agents()) == 6
