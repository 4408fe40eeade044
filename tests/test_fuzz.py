"""Property-based fuzzing of the envelope decoder and the policy loader: no crash, every rejection explained."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sekisho.controller.policy.loader import PolicyError, parse_policy
from sekisho.protocol import errors, events, messages, signing

KEY = signing.generate_key()
GOOD = events.build_event(KEY, agent="term-001", seq=1, type="test.synthetic", payload={"n": 1})

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


def _assert_rejects_cleanly(raw: bytes) -> None:
    try:
        decoded = events.decode_event(raw, topic_agent="term-001")
        decoded.verify(KEY.public_key())
    except errors.Rejected as err:
        assert err.reason and err.detail


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_decoder_survives_random_bytes(raw):
    _assert_rejects_cleanly(raw)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["v", "agent", "seq", "id", "type", "at", "clock", "payload"]), json_values)
def test_decoder_survives_mutated_fields(field, value):
    doc = json.loads(GOOD)
    doc["event"][field] = value
    _assert_rejects_cleanly(json.dumps(doc).encode())


@settings(max_examples=300)
@given(json_values)
def test_decoder_survives_random_payloads(payload):
    doc = json.loads(GOOD)
    doc["event"]["payload"] = payload
    _assert_rejects_cleanly(json.dumps(doc).encode())


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_control_messages_survive_random_bytes(raw):
    pub = KEY.public_key()
    for opener in (
        lambda: messages.open_ack(raw, pub, "a"),
        lambda: messages.open_bundle(raw, pub, "a"),
        lambda: messages.open_command(raw, pub, "a"),
        lambda: messages.open_heartbeat(raw, pub, "a"),
    ):
        try:
            opener()
        except errors.Rejected as err:
            assert err.reason


yaml_like = st.text(alphabet=st.sampled_from(list("abcdeipst:-[]{}, \n'\"#&*!|>%@`0123456789")), max_size=200)


@settings(max_examples=400)
@given(yaml_like)
@example("[]:")  # a list as a mapping key: once a TypeError from the duplicate-key check
@example("{a: 1}: x")
def test_policy_loader_survives_random_text(text):
    try:
        parse_policy(text)
    except PolicyError as err:
        assert err.problems and all(p for p in err.problems)


@settings(max_examples=300)
@given(json_values)
def test_policy_loader_survives_random_documents(doc):
    try:
        parse_policy(json.dumps({"site": {"name": "x"}, "people": doc}))
    except PolicyError as err:
        assert err.problems


@settings(max_examples=500)
@given(json_values, st.sampled_from(["", " ", "-", "－", "\n", "番号"]))
def test_my_number_gate_has_no_false_negatives(payload, glue):
    # The cheap gate over the serialised message must never hide a My Number the field walk would find.
    from sekisho.protocol import mynumber

    number = "98765432101" + str(mynumber.check_digit("98765432101"))
    doc = {"a": payload, "b": f"x{glue}{number[:4]}{glue[:1]}{number[4:8]}{glue[:1]}{number[8:]}"}
    for candidate in (payload, doc):
        text = json.dumps(candidate, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
        if next(mynumber.find_my_numbers(candidate), None) is not None:
            assert mynumber.may_contain_my_number(text)
