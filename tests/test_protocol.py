"""The wire contract: round trips, and every rejection carries its reason."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest

from sekisho.protocol import errors, events, messages, mynumber, signing, timefmt, topics
from sekisho.protocol.canonical import canonical_bytes


@pytest.fixture(scope="module")
def key():
    return signing.generate_key()


def synthetic_my_number(prefix: str = "98765432101") -> str:
    return prefix + str(mynumber.check_digit(prefix))


def event(key, **overrides):
    fields = {"agent": "term-001", "seq": 7, "type": "test.synthetic", "payload": {"n": 7}}
    fields.update(overrides)
    return events.build_event(key, **fields)


def reason_of(raw: bytes, *, topic_agent: str | None = "term-001", key=None) -> str:
    with pytest.raises(errors.Rejected) as info:
        decoded = events.decode_event(raw, topic_agent=topic_agent)
        if key is not None:
            decoded.verify(key)
    assert info.value.detail, "every rejection explains itself"
    return info.value.reason


def tamper(raw: bytes, mutate) -> bytes:
    doc = json.loads(raw)
    mutate(doc)
    # Canonical serialisation (floats allowed here, to test their refusal), so only the mutation is wrong.
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def test_event_round_trip_verifies(key):
    raw = event(key, payload={"n": 3, "note": "見本"})
    decoded = events.decode_event(raw, topic_agent="term-001")
    decoded.verify(key.public_key())
    assert (decoded.agent, decoded.seq, decoded.type, decoded.payload["note"]) == (
        "term-001",
        7,
        "test.synthetic",
        "見本",
    )


@pytest.mark.parametrize(
    ("raw_factory", "reason"),
    [
        (lambda k: b"\xff\xfe", errors.MALFORMED),
        (lambda k: b"{not json", errors.MALFORMED),
        (lambda k: b"[]", errors.MALFORMED),
        (lambda k: b"x" * (events.MAX_EVENT_BYTES + 1), errors.TOO_LARGE),
        (lambda k: tamper(event(k), lambda d: d["event"].update(v=2)), errors.UNSUPPORTED_VERSION),
        (lambda k: tamper(event(k), lambda d: d["event"].update(type="no.such_type")), errors.UNKNOWN_TYPE),
        (lambda k: tamper(event(k), lambda d: d["event"].update(seq=0)), errors.SCHEMA),
        (lambda k: tamper(event(k), lambda d: d["event"].update(seq="7")), errors.SCHEMA),
        (lambda k: tamper(event(k), lambda d: d["event"].update(extra=1)), errors.SCHEMA),
        (lambda k: tamper(event(k), lambda d: d["event"]["payload"].update(n=-1)), errors.SCHEMA),
        (lambda k: tamper(event(k), lambda d: d["event"]["payload"].update(surprise=True)), errors.SCHEMA),
        (lambda k: tamper(event(k), lambda d: d["event"]["payload"].update(n=1.5)), errors.SCHEMA),
        (lambda k: tamper(event(k), lambda d: d["event"].update(at="2026-11-24 09:00")), errors.SCHEMA),
        (lambda k: tamper(event(k), lambda d: d.update(sig=5)), errors.MALFORMED),
        (lambda k: event(k, agent="term-002"), errors.TOPIC_MISMATCH),
        # Regression (attack run): a non-canonical wire form, a duplicate key placed before the signed one,
        # a lone surrogate and deep nesting are refused with a reason instead of raising elsewhere.
        (lambda k: json.dumps(json.loads(event(k))).encode(), errors.MALFORMED),
        (lambda k: event(k).replace(b'{"event":{', b'{"event":{"type":"door.opened",', 1), errors.MALFORMED),
        (lambda k: event(k).replace(b'"payload":{', b'"payload":{"note":"\\ud800",', 1), errors.MALFORMED),
        (
            lambda k: event(k).replace(b'"payload":{', b'"payload":{"deep":' + b"[" * 985 + b"]" * 985 + b",", 1),
            errors.MALFORMED,
        ),
    ],
)
def test_decoder_rejects_with_reason(key, raw_factory, reason):
    assert reason_of(raw_factory(key)) == reason


def test_forged_and_tampered_events_fail_signature(key):
    other = signing.generate_key()
    assert reason_of(event(other), key=key.public_key()) == errors.BAD_SIGNATURE
    edited = tamper(event(key), lambda d: d["event"]["payload"].update(n=8))
    assert reason_of(edited, key=key.public_key()) == errors.BAD_SIGNATURE


def test_controller_refuses_my_number_even_if_agent_signed_it(key):
    number = synthetic_my_number()
    body = {
        "v": 1,
        "agent": "term-001",
        "seq": 1,
        "id": "0" * 32,
        "type": "test.synthetic",
        "at": timefmt.fmt(timefmt.now()),
        "clock": {"synced": False, "offset_ms": None},
        "payload": {"n": 1, "note": f"番号 {number[:4]}-{number[4:8]}-{number[8:]} を確認"},
    }
    raw = canonical_bytes({"event": body, "sig": signing.sign(key, "event", body)})
    assert reason_of(raw) == errors.MY_NUMBER


def test_agent_refuses_to_build_a_my_number_event(key):
    with pytest.raises(errors.Rejected) as info:
        event(key, payload={"n": 1, "note": synthetic_my_number()})
    assert info.value.reason == errors.MY_NUMBER


def test_my_number_guard_is_precise():
    number = synthetic_my_number()
    wrong_check = number[:11] + str((int(number[11]) + 1) % 10)
    assert mynumber.contains_my_number(f"ID:{number}")
    assert mynumber.contains_my_number("".join(chr(ord(c) + 0xFEE0) for c in number))  # full-width digits
    assert not mynumber.contains_my_number(wrong_check)
    assert not mynumber.contains_my_number(number + "5")  # 13 digits is not a My Number
    assert not mynumber.contains_my_number(f"deadbeef{number}cafe")  # inside a hex digest
    assert list(mynumber.find_my_numbers({"a": [1, {"b": int(number)}]})) == ["$.a[1].b"]
    assert number not in json.dumps(mynumber.redact({"x": f"no {number}", "y": int(number)}))


def test_hex_ids_do_not_trip_the_guard(key):
    # A 12-digit run inside a UUID or digest must not dead-letter an ordinary event.
    for i in range(2000):
        events.decode_event(event(key, seq=i + 1))


def test_ack_round_trip_and_forgery(key):
    raw = messages.build_ack(key, "term-001", [5, 1, 2, 3, 9])
    ack = messages.open_ack(raw, key.public_key(), "term-001")
    assert ack.ranges == [(1, 3), (5, 5), (9, 9)]
    with pytest.raises(errors.Rejected) as info:
        messages.open_ack(raw, signing.generate_key().public_key(), "term-001")
    assert info.value.reason == errors.BAD_SIGNATURE
    with pytest.raises(errors.Rejected) as info:
        messages.open_ack(raw, key.public_key(), "term-002")
    assert info.value.reason == errors.WRONG_AGENT


def test_signature_is_bound_to_the_message_kind(key):
    body = json.loads(messages.build_ack(key, "term-001", [1]))
    as_bundle = canonical_bytes({"bundle": body["ack"], "sig": body["sig"]})
    with pytest.raises(errors.Rejected) as info:
        messages.open_bundle(as_bundle, key.public_key(), "term-001")
    assert info.value.reason == errors.BAD_SIGNATURE


def test_command_window(key):
    pub = key.public_key()
    _, raw = messages.build_command(key, agent="door-1", name="door.remote_unlock", args={"door": "d1"})
    assert messages.open_command(raw, pub, "door-1").command.args == {"door": "d1"}
    for agent, now, reason in [
        ("door-2", None, errors.WRONG_AGENT),
        ("door-1", timefmt.now() + timedelta(minutes=2), errors.EXPIRED),
        ("door-1", timefmt.now() - timedelta(minutes=5), errors.NOT_YET_VALID),
    ]:
        with pytest.raises(errors.Rejected) as info:
            messages.open_command(raw, pub, agent, now=now)
        assert info.value.reason == reason
    with pytest.raises(ValueError):
        messages.build_command(key, agent="door-1", name="x", lifetime=timedelta(hours=1))


def test_bundle_expiry_and_addressee(key):
    raw = messages.build_bundle(key, agent="term-001", version=3, policy={}, lifetime=timedelta(hours=1))
    verified = messages.open_bundle(raw, key.public_key(), "term-001")
    assert not verified.expired()
    assert verified.expired(timefmt.now() + timedelta(hours=2))
    with pytest.raises(errors.Rejected):
        messages.open_bundle(raw, key.public_key(), "term-002")


def test_topics_layout():
    assert topics.topic("term-001", topics.EVENTS) == "sekisho/v1/agents/term-001/events"
    assert topics.parse("sekisho/v1/agents/term-001/acks") == ("term-001", "acks")
    assert topics.all_agents(topics.EVENTS, shared_group="controllers").startswith("$share/controllers/")
    for bad in ["sekisho/v1/agents/Term/events", "sekisho/v1/agents/a/b/events", "other/t", "sekisho/v1/agents/a/x"]:
        with pytest.raises(errors.Rejected):
            topics.parse(bad)


def test_optional_field_left_out_still_decodes_regression_demo_dead_letters(key):
    # Regression: build_event dropped None fields while the schema required them, so the controller
    # dead-lettered every door.access_denied for an unknown card.
    raw = event(key, type="door.access_denied", payload={"door": "d1", "reason": "unknown_card", "card_masked": "****"})
    decoded = events.decode_event(raw, topic_agent="term-001")
    assert decoded.payload["person"] is None
