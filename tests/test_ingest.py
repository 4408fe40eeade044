"""Controller ingest against a real broker: forged, malformed and My-Number events are dead-lettered
with their reason, acknowledged only when the agent's own signature proves origin, and never crash it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from support.lab import running_site
from support.mqtt import connect_client
from support.site import wait_for

from sekisho.controller.api.app import create_app
from sekisho.controller.api.deps import AppState
from sekisho.controller.service import Controller
from sekisho.deploy.pki import AgentCredentials
from sekisho.lab import Lab
from sekisho.protocol import canonical, errors, events, messages, mynumber, signing, timefmt, topics

pytestmark = pytest.mark.broker
AGENT = "term-i1"


@pytest.fixture
def running(pki: Path, tmp_path: Path) -> Iterator[tuple[Lab, Controller]]:
    with running_site(pki, tmp_path / "site", agents=(AGENT, "term-unregistered"), registered=(AGENT,)) as site:
        yield site


def agent_key(lab: Lab, name: str = AGENT):
    return signing.load_private_key(AgentCredentials.at(lab.pki_dir, name).signing_key)


def controller_pub(lab: Lab):
    return signing.load_public_key(AgentCredentials.at(lab.pki_dir, AGENT).controller_signing_pub)


def signed_raw(key, body: dict) -> bytes:
    return canonical.canonical_bytes({"event": body, "sig": signing.sign(key, "event", body)})


def body(seq: int, type_: str = "test.synthetic", payload: dict | None = None, agent: str = AGENT) -> dict:
    return {
        "v": 1,
        "agent": agent,
        "seq": seq,
        "id": f"{seq:032x}",
        "type": type_,
        "at": timefmt.fmt(timefmt.now()),
        "clock": {"synced": False, "offset_ms": None},
        "payload": payload if payload is not None else {"n": seq, "note": ""},
    }


def acked_seqs(client, lab: Lab, timeout: float = 3.0) -> set[int]:
    seqs: set[int] = set()
    try:
        while True:
            msg = client.next_message(timeout=timeout)
            ack = messages.open_ack(msg.payload, controller_pub(lab), AGENT)
            for first, last in ack.ranges:
                seqs.update(range(first, last + 1))
    except Exception:  # queue empty: no more acks within the timeout
        return seqs


def test_bad_events_are_dead_lettered_with_reasons_and_only_proven_ones_acked(running) -> None:
    lab, ctl = running
    key = agent_key(lab)
    number = "12345678901" + str(mynumber.check_digit("12345678901"))
    client = connect_client(lab.pki_dir, lab.broker.port, AGENT)
    client.subscribe_wait(topics.topic(AGENT, topics.ACKS))
    events_topic = topics.topic(AGENT, topics.EVENTS)
    cases = [
        events.build_event(key, agent=AGENT, seq=1, type="test.synthetic", payload={"n": 1}),  # good
        signed_raw(signing.generate_key(), body(2)),  # forged: wrong key
        signed_raw(key, body(3, type_="no.such_type")),  # signed, unknown type
        signed_raw(key, body(4, payload={"n": 4, "note": f"個人番号 {number}"})),  # signed, My Number
        b"\x00garbage",  # malformed
        signed_raw(key, body(6, agent="term-other")),  # wrong topic for the claimed agent
        signed_raw(key, body(7, payload={"n": 7, "note": "x", "extra": True})),  # schema
    ]
    for raw in cases:
        client.publish_wait(events_topic, raw)
    wait_for(lambda: ctl.worker.stats.received >= len(cases), 10, "ingest to see every message")
    acked = acked_seqs(client, lab)
    client.close()

    store = ctl.store
    assert store.event_seqs(AGENT) == [1]
    letters = {d.reason: d for d in store.list_dead_letters(limit=100)}
    assert set(letters) == {
        errors.BAD_SIGNATURE,
        errors.UNKNOWN_TYPE,
        errors.MY_NUMBER,
        errors.MALFORMED,
        errors.TOPIC_MISMATCH,
        errors.SCHEMA,
    }
    assert all(d.detail for d in letters.values())
    # The My Number itself is nowhere in the dead letter.
    assert number not in letters[errors.MY_NUMBER].payload
    assert "REDACTED" in letters[errors.MY_NUMBER].payload
    # Acked: the stored event and the dead letters the agent provably sent; never the forged seq 2.
    assert acked == {1, 3, 4, 7}
    # Acked dead letters (3, 4, 7) do not read as sequence gaps; the unproven ones (2, 5, 6) do.
    gaps = sorted((f.first_seq, f.last_seq) for f in store.list_findings(open_only=True) if f.agent_id == AGENT)
    assert gaps == [(2, 2), (5, 6)]
    assert ctl.worker.stats.store_errors == 0


def test_unregistered_agent_is_refused(running) -> None:
    lab, ctl = running
    name = "term-unregistered"
    key = agent_key(lab, name)
    client = connect_client(lab.pki_dir, lab.broker.port, name)
    client.publish_wait(
        topics.topic(name, topics.EVENTS),
        events.build_event(key, agent=name, seq=1, type="test.synthetic", payload={"n": 1}),
    )
    wait_for(lambda: ctl.worker.stats.dead_lettered >= 1, 10, "the event to be dead-lettered")
    client.close()
    [letter] = ctl.store.list_dead_letters(limit=10)
    assert (letter.reason, letter.agent_id, letter.seq) == (errors.UNKNOWN_AGENT, name, 1)
    assert ctl.store.event_seqs(name) == []


def test_duplicates_are_stored_once_and_acked_again(running) -> None:
    lab, ctl = running
    key = agent_key(lab)
    raw = events.build_event(key, agent=AGENT, seq=1, type="test.synthetic", payload={"n": 1})
    client = connect_client(lab.pki_dir, lab.broker.port, AGENT)
    client.subscribe_wait(topics.topic(AGENT, topics.ACKS))
    for _ in range(3):
        client.publish_wait(topics.topic(AGENT, topics.EVENTS), raw)
    wait_for(lambda: ctl.worker.stats.received >= 3, 10, "ingest to see the copies")
    assert acked_seqs(client, lab) == {1}
    client.close()
    assert ctl.store.event_seqs(AGENT) == [1]
    assert ctl.worker.stats.duplicates == 2


def test_a_conflicting_duplicate_is_kept_as_evidence_and_raised(running) -> None:
    """Same seq and id, other content signed by the agent's key: never acked-and-dropped as a copy (issue 10)."""
    lab, ctl = running
    key = agent_key(lab)
    first = body(1)
    original = signed_raw(key, first)
    conflicting = signed_raw(key, {**first, "payload": {"n": 1, "note": "another story"}})
    client = connect_client(lab.pki_dir, lab.broker.port, AGENT)
    client.subscribe_wait(topics.topic(AGENT, topics.ACKS))
    events_topic = topics.topic(AGENT, topics.EVENTS)
    client.publish_wait(events_topic, original)
    wait_for(lambda: ctl.store.event_seqs(AGENT) == [1], 10, "the original to be stored")
    client.publish_wait(events_topic, original)  # an exact copy: harmless
    client.publish_wait(events_topic, conflicting)
    wait_for(lambda: ctl.worker.stats.received >= 3, 10, "ingest to see all three")
    assert acked_seqs(client, lab) == {1}  # kept as evidence, so the agent may drop it
    client.close()

    store = ctl.store
    [stored] = store.list_events(agent_id=AGENT)
    assert stored.raw.encode() == original
    [letter] = store.list_dead_letters()
    assert (letter.reason, letter.seq, letter.event_id) == (errors.SEQ_CONFLICT, 1, first["id"])
    assert letter.payload.encode() == conflicting
    [finding] = store.list_findings(open_only=True, kind=errors.SEQ_CONFLICT)
    assert (finding.agent_id, finding.first_seq, finding.detail["dead_letter_id"]) == (AGENT, 1, letter.id)
    assert ctl.worker.stats.duplicates == 1
    assert store.verify_chains(signatures=True) == []


def test_read_api(running) -> None:
    lab, ctl = running
    key = agent_key(lab)
    client = connect_client(lab.pki_dir, lab.broker.port, AGENT)
    for seq in range(1, 6):
        client.publish_wait(
            topics.topic(AGENT, topics.EVENTS),
            events.build_event(key, agent=AGENT, seq=seq, type="test.synthetic", payload={"n": seq}),
        )
    client.close()
    wait_for(lambda: len(ctl.store.event_seqs(AGENT)) == 5, 10, "five stored events")
    api = TestClient(create_app(AppState(ctl.config, ctl.store, ctl.worker.stats)))
    assert api.get("/healthz").json()["status"] == "ok"
    assert api.get("/readyz").json()["checks"]["broker"] == "connected"
    page = api.get("/api/v1/events", params={"agent_id": AGENT, "limit": 2}).json()
    assert [e["seq"] for e in page["items"]] == [1, 2]
    nxt = api.get("/api/v1/events", params={"agent_id": AGENT, "after_id": page["next_after_id"]}).json()
    assert [e["seq"] for e in nxt["items"]] == [3, 4, 5] and nxt["next_after_id"] is None
    assert api.get("/api/v1/events", params={"limit": 0}).status_code == 422
    assert "/api/v1/events" in api.get("/openapi.json").json()["paths"]

    # A production controller refuses the records API without a token.
    prod = ctl.config.model_copy(update={"profile": "production", "api_tokens": [_secret("t" * 32)]})
    secured = TestClient(create_app(AppState(prod, ctl.store, ctl.worker.stats)))
    assert secured.get("/api/v1/events").status_code == 401
    assert (
        secured.get("/api/v1/events", headers={"Authorization": "Bearer wrong-token-xxxxxxxxxxxxxxx"}).status_code
        == 401
    )
    ok = secured.get("/api/v1/events", headers={"Authorization": "Bearer " + "t" * 32})
    assert ok.status_code == 200 and len(ok.json()["items"]) == 5
    assert secured.get("/healthz").status_code == 200


def _secret(value: str):
    from pydantic import SecretStr

    return SecretStr(value)


def test_controller_config_fails_closed(tmp_path: Path) -> None:
    from pydantic import ValidationError

    from sekisho.controller.config import ControllerConfig

    base = {"ca_cert": "a", "tls_cert": "b", "tls_key": "c", "signing_key": "d"}
    with pytest.raises(ValidationError, match="api_tokens"):
        ControllerConfig(**base, profile="dev", http_host="0.0.0.0")
    with pytest.raises(ValidationError, match="24 文字以上"):
        ControllerConfig(**base, profile="dev", api_tokens=["short"])
    with pytest.raises(ValidationError, match="Extra inputs"):
        ControllerConfig(**base, profile="dev", surprise=1)
    assert json.loads(json.dumps({"ok": True}))
