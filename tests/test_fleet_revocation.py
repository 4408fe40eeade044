"""Revocation that bites at once (issue 11, item 3), on a real mosquitto with the production configuration.

The broker is never restarted: the sekisho_agent_acl plugin re-reads the revocation list when the file changes
(checked on the broker's own activity, at most every 500 ms) or at once on SIGHUP, disconnects the agents it
newly revokes and refuses their next CONNECT. A replaced agent's old certificate is refused by its serial while
the new one connects. A missing, broken or oversized list never lifts a revocation: before any good list every
agent is refused, after one the last good list stays in force.
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.mqtt import NOT_AUTHORIZED, ConnectRefused, SyncClient, TlsFiles, connect_client
from support.site import wait_for
from typer.testing import CliRunner

from sekisho.cli import app as sekisho_app
from sekisho.controller.fleet.revocations import ROUTE
from sekisho.deploy.broker import Broker
from sekisho.deploy.pki import AgentCredentials, PkiPaths, issue_agent, load_cert
from sekisho.protocol import signing, timefmt, topics
from sekisho.protocol.revocations import MAX_LIST_BYTES, RevocationList, parse_broker_text, serial_text

pytestmark = pytest.mark.broker

REVOKED = "agent-a"
HONEST = "agent-b"
# How long a change may take to bite: the plugin looks at the file at most every 500 ms of broker activity.
BITE_S = 5.0


@pytest.fixture
def clients() -> Iterator[list[SyncClient]]:
    """Clients registered here are closed after the test, even when it fails."""
    opened: list[SyncClient] = []
    yield opened
    for client in opened:
        client.close()


def _keep(clients: list[SyncClient], client: SyncClient) -> SyncClient:
    clients.append(client)
    return client


def write_list(broker: Broker, revocations: RevocationList) -> None:
    """Replace the broker's list as the controller does: a new file renamed over the old one."""
    partial = broker.revocations_path.with_name(".revocations.tmp")
    partial.write_text(revocations.broker_text())
    os.replace(partial, broker.revocations_path)


def write_raw(broker: Broker, data: bytes) -> None:
    """Replace the list with arbitrary bytes (atomically, so the plugin never reads it half-written)."""
    partial = broker.revocations_path.with_name(".revocations.tmp")
    partial.write_bytes(data)
    os.replace(partial, broker.revocations_path)


def watch(client: SyncClient) -> SyncClient:
    """Note when the broker drops the client (paho keeps reporting is_connected() after a server DISCONNECT)."""
    dropped = threading.Event()
    client.on_disconnect = lambda *_: dropped.set()
    client.dropped = dropped  # type: ignore[attr-defined]
    return client


def dropped(client: SyncClient) -> bool:
    """Tell whether the broker has dropped a watched client."""
    event: threading.Event = client.dropped  # type: ignore[attr-defined]
    return event.is_set()


def _connected(pki: Path, broker: Broker, name: str, clients: list[SyncClient]) -> SyncClient:
    client = _keep(clients, connect_client(pki, broker.port, name, clean_start=False, session_expiry=600))
    assert [r.value for r in client.subscribe_wait(topics.topic(name, topics.COMMANDS))] == [1]
    return watch(client)


def _until_dropped(victim: SyncClient, honest: SyncClient | None) -> None:
    """Wait (bounded) until the broker drops `victim`; the honest agent keeps publishing meanwhile."""
    deadline = time.monotonic() + BITE_S
    while not dropped(victim):
        if time.monotonic() > deadline:
            raise AssertionError(f"the revoked client was still connected after {BITE_S}s")
        if honest is not None:
            assert not honest.publish_wait(topics.topic(HONEST, topics.HEARTBEAT), b"hb", qos=0).is_failure
        time.sleep(0.1)


def _refused(pki: Path | TlsFiles, broker: Broker, name: str) -> None:
    with pytest.raises(ConnectRefused) as refused:
        connect_client(pki, broker.port, name, identity=name)
    assert refused.value.reason is not None and refused.value.reason.value == NOT_AUTHORIZED


def _taken(tls: Path | TlsFiles, broker: Broker, name: str) -> None:
    """Wait (bounded) until the broker refuses `name`: a SIGHUP is handled by the broker's loop a little later."""
    wait_for(lambda: not _connects(tls, broker, name), BITE_S, f"{name} refused")
    _refused(tls, broker, name)


def _log(broker: Broker) -> str:
    return broker.log_path.read_text(errors="replace")


# --- revoke: dropped within seconds, refused afterwards, no restart ------------------------------------


def test_revoked_agent_is_dropped_and_refused_without_a_restart(
    pki: Path, broker: Broker, clients: list[SyncClient]
) -> None:
    pid = broker.pid
    victim = _connected(pki, broker, REVOKED, clients)
    honest = _connected(pki, broker, HONEST, clients)

    write_list(broker, RevocationList(frozenset({REVOKED})))
    # The victim sends nothing: the broker's other traffic (an honest agent's heartbeats) is enough.
    _until_dropped(victim, honest)

    _refused(pki, broker, REVOKED)
    assert not dropped(honest)
    assert not honest.publish_wait(topics.topic(HONEST, topics.EVENTS), b"still-here").is_failure
    assert broker.pid == pid, "the broker was restarted"
    assert "sekisho_agent_acl: refused agent-a: agent revoked" in _log(broker)


def test_sighup_drops_a_revoked_agent_on_an_idle_broker(pki: Path, broker: Broker, clients: list[SyncClient]) -> None:
    victim = _connected(pki, broker, REVOKED, clients)
    write_list(broker, RevocationList(frozenset({REVOKED})))
    broker.reload()  # what `systemctl reload mosquitto` and `sekisho fleet revocations sync --reload-pid` do
    _until_dropped(victim, None)
    _refused(pki, broker, REVOKED)


def test_a_revoked_agent_that_keeps_sending_is_dropped(pki: Path, broker: Broker, clients: list[SyncClient]) -> None:
    victim = _connected(pki, broker, REVOKED, clients)
    write_list(broker, RevocationList(frozenset({REVOKED})))
    time.sleep(0.6)  # past the plugin's re-check interval: its own next publish makes it look
    victim.publish(topics.topic(REVOKED, topics.EVENTS), b"after-revocation", qos=1)
    wait_for(lambda: dropped(victim), BITE_S, "the revoked publisher dropped")
    # Dropped for the revocation: denied at its publish, or kicked as the plugin read the list again on the
    # broker's activity, whichever came first. mosquitto writes its log file buffered: wait for the line.
    wait_for(
        lambda: (
            "denied sekisho/v1/agents/agent-a/events to agent-a and disconnected it: agent revoked" in _log(broker)
            or "revocation list: 1 agent(s)" in _log(broker)
        ),
        BITE_S,
        "the broker's log to name the revocation",
    )


def test_lifting_a_revocation_lets_the_agent_back(pki: Path, broker: Broker) -> None:
    write_list(broker, RevocationList(frozenset({REVOKED})))
    broker.reload()
    _taken(pki, broker, REVOKED)
    write_list(broker, RevocationList())
    broker.reload()
    wait_for(lambda: _connects(pki, broker, REVOKED), BITE_S, "the agent accepted again")


def _connects(tls: Path | TlsFiles, broker: Broker, name: str) -> bool:
    try:
        connect_client(tls, broker.port, name, identity=name).close()
    except ConnectRefused:
        return False
    return True


# --- replace: only the old certificate is refused --------------------------------------------------------


@pytest.fixture
def replaced(pki: Path, tmp_path: Path) -> tuple[TlsFiles, TlsFiles]:
    """agent-a's certificate in the session PKI (old) and a new one issued for the same name (new)."""
    copy = Path(shutil.copytree(pki, tmp_path / "pki"))
    old = AgentCredentials.at(pki, REVOKED)
    new = issue_agent(copy, REVOKED, force=True)
    return TlsFiles(old.ca_cert, old.tls_cert, old.tls_key), TlsFiles(new.ca_cert, new.tls_cert, new.tls_key)


def test_replaced_certificate_is_refused_and_the_new_one_connects(
    broker: Broker, replaced: tuple[TlsFiles, TlsFiles], clients: list[SyncClient]
) -> None:
    old, new = replaced
    assert old.cert is not None and new.cert is not None
    old_serial = serial_text(load_cert(old.cert).serial_number)
    live_old = watch(_keep(clients, connect_client(old, broker.port, REVOKED)))

    write_list(broker, RevocationList(serials={old_serial: REVOKED}))
    broker.reload()
    wait_for(lambda: dropped(live_old), BITE_S, "the old certificate's connection dropped")

    _refused(old, broker, REVOKED)
    fresh = watch(_keep(clients, connect_client(new, broker.port, REVOKED)))
    assert [r.value for r in fresh.subscribe_wait(topics.topic(REVOKED, topics.COMMANDS))] == [1]
    # The old certificate cannot knock the new one off by taking its client id either: refused at CONNECT,
    # before mosquitto would close the existing connection with that id.
    _refused(old, broker, REVOKED)
    assert not dropped(fresh)
    assert f"Client {REVOKED} already connected, closing old connection" not in _log(broker)


def test_username_must_be_the_certificate_name(pki: Path, broker: Broker) -> None:
    # Asking for another agent's name with one's own certificate is refused at CONNECT.
    with pytest.raises(ConnectRefused):
        connect_client(agent_files(pki, HONEST), broker.port, REVOKED, identity=REVOKED)


def agent_files(pki: Path, name: str) -> TlsFiles:
    """The TLS files of an agent of the session PKI."""
    creds = AgentCredentials.at(pki, name)
    return TlsFiles(creds.ca_cert, creds.tls_cert, creds.tls_key)


# --- failure modes: fail closed, never lift a revocation ------------------------------------------------


class _BrokerWithoutList(Broker):
    """A broker whose revocation list has not been written yet (a new broker host before the first sync)."""

    def write_config(self) -> None:
        super().write_config()
        self.revocations_path.unlink()


def test_without_a_list_every_agent_is_refused_until_one_is_written(pki: Path, tmp_path: Path) -> None:
    with _BrokerWithoutList(pki, tmp_path / "broker") as broker:
        _refused(pki, broker, HONEST)
        assert "refusing every agent until it can be read" in _log(broker)
        write_list(broker, RevocationList())
        wait_for(lambda: _connects(pki, broker, HONEST), BITE_S, "agents accepted once a list exists")


BROKEN_LISTS = {
    "truncated (no end line)": b"sekisho-revocations 1\nname agent-b\n",
    "count does not match": b"sekisho-revocations 1\nname agent-b\nend 2\n",
    "wrong first line": b"revocations\nend 0\n",
    "unknown entry": b"sekisho-revocations 1\nfingerprint AB agent-b\nend 1\n",
    "bad name": b"sekisho-revocations 1\nname Agent/+\nend 1\n",
    "bad serial": b"sekisho-revocations 1\nserial 0a1b agent-b\nend 1\n",
    "NUL byte": b"sekisho-revocations 1\nname agent-b\x00\nend 1\n",
    "empty": b"",
}


@pytest.mark.parametrize("broken", sorted(BROKEN_LISTS))
def test_a_broken_list_keeps_the_last_good_one(pki: Path, broker: Broker, broken: str) -> None:
    write_list(broker, RevocationList(frozenset({REVOKED})))
    broker.reload()
    _taken(pki, broker, REVOKED)
    # Every broken list would, if taken at face value, change who is refused: agent-a let in, or agent-b out.
    write_raw(broker, BROKEN_LISTS[broken])
    broker.reload()
    wait_for(lambda: "keeping the last good list" in _log(broker), BITE_S, "the broken list logged")
    _refused(pki, broker, REVOKED)
    assert _connects(pki, broker, HONEST)
    with pytest.raises(ValueError):
        parse_broker_text(BROKEN_LISTS[broken].decode(errors="replace"))


def test_a_deleted_or_oversized_list_keeps_the_last_good_one(pki: Path, broker: Broker) -> None:
    write_list(broker, RevocationList(frozenset({REVOKED})))
    broker.reload()
    _taken(pki, broker, REVOKED)
    broker.revocations_path.unlink()
    broker.reload()
    wait_for(lambda: "missing: keeping the last good list" in _log(broker), BITE_S, "the deleted list logged")
    _refused(pki, broker, REVOKED)
    assert _connects(pki, broker, HONEST)

    # Over the 8 MiB bound: refused whole, even though it is well formed and would revoke nobody.
    filler = "# " + "x" * 1000 + "\n"
    huge = "sekisho-revocations 1\n" + filler * (MAX_LIST_BYTES // len(filler) + 1) + "end 0\n"
    write_raw(broker, huge.encode())
    broker.reload()
    wait_for(lambda: "larger than the bound" in _log(broker), BITE_S, "the oversized list logged")
    _refused(pki, broker, REVOKED)

    # A good list again is taken at once.
    write_list(broker, RevocationList())
    broker.reload()
    wait_for(lambda: _connects(pki, broker, REVOKED), BITE_S, "the good list taken again")


def test_list_text_round_trips_and_refuses_what_the_plugin_refuses() -> None:
    revocations = RevocationList(frozenset({"term-07"}), {serial_text(0x0A5F): "term-03"})
    text = revocations.broker_text()
    assert text.splitlines()[0] == "sekisho-revocations 1" and text.splitlines()[-1] == "end 2"
    assert "serial 0A5F term-03" in text
    assert parse_broker_text(text).same_entries(revocations)
    with pytest.raises(ValueError):
        RevocationList(frozenset({"bad/name"}))
    with pytest.raises(ValueError):
        RevocationList(serials={"A5F": "term-03"})  # not whole bytes: OpenSSL would write 0A5F


# --- the controller's side: `fleet revoke`, the signed list, `fleet revocations sync` ---------------------


@pytest.fixture
def controller_site(pki: Path, tmp_path: Path) -> Iterator[tuple[Path, Path, Path]]:
    """A controller.toml (dev profile) whose revocation_list is a broker file; yields (config, list, signing.pub)."""
    from sekisho.lab import write_toml

    lab_pki = PkiPaths.at(pki)
    listed = tmp_path / "broker" / "revocations"
    config = write_toml(
        tmp_path / "controller.toml",
        {
            "profile": "dev",
            "var_dir": str(tmp_path / "var"),
            "ca_cert": str(lab_pki.ca_cert),
            "tls_cert": str(lab_pki.controller_cert),
            "tls_key": str(lab_pki.controller_key),
            "signing_key": str(lab_pki.controller_signing_key),
            "revocation_list": str(listed),
        },
    )
    yield config, listed, lab_pki.controller_signing_pub


def run_cli(*args: str, code: int = 0) -> str:
    """Run `sekisho …` in process; check its exit code and return what it printed (Japanese: tests/conftest.py)."""
    result = CliRunner().invoke(sekisho_app, list(args), env={"COLUMNS": "250"})
    assert result.exit_code == code, result.output
    return result.output


def _register(config: Path, pki: Path, name: str) -> None:
    pub = AgentCredentials.at(pki, name).signing_pub
    run_cli("controller", "register-agent", name, "--public-key", str(pub), "--config", str(config))


def test_fleet_revoke_writes_the_broker_list_and_revoke_agent_still_works(
    pki: Path, controller_site: tuple[Path, Path, Path]
) -> None:
    config, listed, _ = controller_site
    for name in (REVOKED, HONEST):
        _register(config, pki, name)
    assert "失効しました: agent-a" in run_cli("fleet", "revoke", REVOKED, "--config", str(config))
    assert parse_broker_text(listed.read_text()).names == frozenset({REVOKED})
    # The old command is the same action (idempotent for an agent already revoked).
    run_cli("controller", "revoke-agent", REVOKED, "--config", str(config))
    run_cli("controller", "revoke-agent", HONEST, "--config", str(config))
    assert parse_broker_text(listed.read_text()).names == frozenset({REVOKED, HONEST})
    assert "登録されていないエージェントです: 'agent-x'" in run_cli(
        "fleet", "revoke", "agent-x", "--config", str(config), code=2
    )


class _OneDocument(http.server.BaseHTTPRequestHandler):
    """Serves one fixed document at the revocations route (what a controller's API would answer)."""

    document = b""

    def do_GET(self) -> None:
        """Answer the route with the document, anything else with 404."""
        if self.path != ROUTE:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(self.document)

    def log_message(self, format: str, *args: object) -> None:
        """Keep the test output quiet."""


@pytest.fixture
def served() -> Iterator[tuple[str, type[_OneDocument]]]:
    """A loopback HTTP server answering one document; yields (URL, handler class to set it on)."""
    handler = type("Handler", (_OneDocument,), {})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()


def test_sync_writes_the_signed_list_and_refuses_a_forged_one(
    pki: Path, controller_site: tuple[Path, Path, Path], served: tuple[str, type[_OneDocument]], tmp_path: Path
) -> None:
    from fastapi.testclient import TestClient

    from sekisho.controller.api.app import create_app
    from sekisho.controller.api.deps import AppState
    from sekisho.controller.config import load_config
    from sekisho.controller.service import open_store

    config, _, controller_pub = controller_site
    _register(config, pki, REVOKED)
    run_cli("fleet", "revoke", REVOKED, "--config", str(config))
    cfg = load_config(config)
    store = open_store(cfg)
    try:
        answer = TestClient(create_app(AppState(cfg, store, None))).get(ROUTE)
    finally:
        store.engine.dispose()
    assert answer.status_code == 200
    url, handler = served
    output = tmp_path / "remote-broker" / "revocations"
    sync = ("fleet", "revocations", "sync", "--controller", url, "--output", str(output))
    key = ("--controller-key", str(controller_pub))

    handler.document = answer.content
    assert "書き出しました: エージェント 1 台" in run_cli(*sync, *key)
    assert parse_broker_text(output.read_text()).names == frozenset({REVOKED})

    # Someone between the broker and the controller un-revokes the agent: the signature no longer holds.
    forged = json.loads(answer.content)
    forged["revocations"]["names"] = []
    handler.document = json.dumps(forged).encode()
    assert "同期できません" in run_cli(*sync, *key, code=1)
    assert parse_broker_text(output.read_text()).names == frozenset({REVOKED}), "the list the broker had was kept"
    # Signed by another key: refused too.
    other = signing.generate_key().public_key()
    other_pub = tmp_path / "other.pub"
    other_pub.write_bytes(signing.public_key_pem(other))
    handler.document = answer.content
    assert "同期できません" in run_cli(*sync, "--controller-key", str(other_pub), code=1)


def test_sync_refuses_an_older_signed_list_replayed(
    pki: Path, controller_site: tuple[Path, Path, Path], served: tuple[str, type[_OneDocument]], tmp_path: Path
) -> None:
    # A list the controller really signed, but before the revocation: replaying it must not lift the revocation.
    from datetime import timedelta

    from sekisho.protocol.revocations import RevocationList, sign_list

    _, _, controller_pub = controller_site
    key = signing.load_private_key(PkiPaths.at(pki).controller_signing_key)
    now = timefmt.now()
    before = RevocationList(frozenset(), {}, issued_at=now - timedelta(hours=1))
    after = RevocationList(frozenset({REVOKED}), {}, issued_at=now)
    url, handler = served
    output = tmp_path / "remote-broker" / "revocations"
    sync = ("fleet", "revocations", "sync", "--controller", url, "--output", str(output))
    keyopt = ("--controller-key", str(controller_pub))

    handler.document = json.dumps(sign_list(key, after)).encode()
    assert "書き出しました: エージェント 1 台" in run_cli(*sync, *keyopt)
    handler.document = json.dumps(sign_list(key, before)).encode()
    assert "older than the one in" in run_cli(*sync, *keyopt, code=1)
    assert parse_broker_text(output.read_text()).names == frozenset({REVOKED}), "the newer list was kept"
    # A newer list (the revocation lifted on purpose, say) is written as usual.
    lifted = RevocationList(frozenset(), {}, issued_at=now + timedelta(minutes=1))
    handler.document = json.dumps(sign_list(key, lifted)).encode()
    run_cli(*sync, *keyopt)
    assert parse_broker_text(output.read_text()).names == frozenset()
