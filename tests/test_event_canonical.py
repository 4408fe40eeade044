"""An event on the wire must be exactly its canonical form (issue 14 builds that form from the body's bytes
instead of serialising the whole document again): every other spelling of the same content is refused."""

from __future__ import annotations

import json

import pytest

from sekisho.protocol import errors, events, signing

KEY = signing.generate_key()


def _doc() -> dict[str, object]:
    raw = events.build_event(KEY, agent="term-c1", seq=7, type="test.synthetic", payload={"n": 7, "note": "改札 é"})
    doc: dict[str, object] = json.loads(raw)
    return doc


def test_the_canonical_form_is_accepted() -> None:
    doc = _doc()
    raw = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    decoded = events.decode_event(raw, topic_agent="term-c1")
    decoded.verify(KEY.public_key())
    assert decoded.raw == raw


@pytest.mark.parametrize(
    "spelling",
    [
        pytest.param({"separators": (", ", ": "), "sort_keys": True, "ensure_ascii": False}, id="whitespace"),
        pytest.param({"separators": (",", ":"), "sort_keys": True, "ensure_ascii": True}, id="escaped-non-ascii"),
        pytest.param({"separators": (",", ":"), "sort_keys": False, "ensure_ascii": False}, id="sig-first"),
    ],
)
def test_another_spelling_of_the_same_event_is_refused(spelling: dict[str, object]) -> None:
    doc = _doc()
    if not spelling["sort_keys"]:
        doc = {"sig": doc["sig"], "event": doc["event"]}
    raw = json.dumps(doc, **spelling).encode()  # type: ignore[arg-type]
    with pytest.raises(errors.Rejected) as refused:
        events.decode_event(raw, topic_agent="term-c1")
    assert refused.value.reason == errors.MALFORMED


def test_an_escaped_signature_is_refused() -> None:
    doc = _doc()
    sig = str(doc["sig"])
    raw = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    escaped = raw.replace(f'"sig":"{sig[0]}'.encode(), f'"sig":"\\u{ord(sig[0]):04x}'.encode())
    assert escaped != raw
    with pytest.raises(errors.Rejected) as refused:
        events.decode_event(escaped, topic_agent="term-c1")
    assert refused.value.reason == errors.MALFORMED
