"""The My Number guard (protocol/mynumber.py): a table of notations, what is and is not a My Number.

Every valid number here is computed at test time with check_digit() from an obviously synthetic 11-digit
prefix; no fixture holds a valid My Number literal. Each notation is tried with the valid number (must be
found, by the precise check and by the cheap gate, and redacted) and with the same number given a wrong
check digit (must not be found: synthetic data in tests relies on that).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sekisho.protocol import canonical, errors, events, messages, mynumber, signing, timefmt

PREFIX = "98765432101"  # synthetic: a descending run
ZERO_PREFIX = "09876543210"  # synthetic, starts with 0: as an integer it loses that digit


def valid(prefix: str = PREFIX) -> str:
    """Return prefix plus its check digit: a number the guard must treat as a My Number."""
    return prefix + str(mynumber.check_digit(prefix))


def wrong(prefix: str = PREFIX) -> str:
    """Return the same 12 digits with a wrong check digit: synthetic data, never refused."""
    number = valid(prefix)
    return number[:11] + str((int(number[11]) + 1) % 10)


def grouped(sep: str) -> Callable[[str], str]:
    return lambda n: sep.join((n[:4], n[4:8], n[8:]))


def fullwidth(text: str) -> str:
    return "".join(chr(ord(c) + 0xFEE0) if c.isdigit() else c for c in text)


def digits_in(base: int) -> Callable[[str], str]:
    """Write the digits in another script (base = the code point of its zero)."""
    return lambda n: "".join(chr(base + int(c)) if c.isdigit() else c for c in n)


# Notations of a 12-digit string that the guard must read as that number.
NOTATIONS: dict[str, Callable[[str], str]] = {
    "plain": lambda n: n,
    "hyphen 4-4-4": grouped("-"),
    "space 4-4-4": grouped(" "),
    "ideographic space U+3000": grouped("\u3000"),
    "en dash": grouped("\u2013"),
    "em dash": grouped("\u2014"),
    "hyphen U+2010": grouped("\u2010"),
    "non-breaking hyphen U+2011": grouped("\u2011"),
    "figure dash U+2012": grouped("\u2012"),
    "horizontal bar U+2015": grouped("\u2015"),
    "katakana prolonged sound mark ー": grouped("ー"),
    "half-width prolonged sound mark ｰ": grouped("\uff70"),
    "minus sign U+2212": grouped("\u2212"),
    "full-width hyphen-minus": grouped("\uff0d"),
    "small hyphen-minus U+FE63": grouped("\ufe63"),
    "wave dash 〜": grouped("〜"),
    "no-break space": grouped("\u00a0"),
    "narrow no-break space": grouped("\u202f"),
    "thin space": grouped("\u2009"),
    "tab": grouped("\t"),
    "space-hyphen-space": grouped(" - "),
    "several spaces": grouped("   "),
    "dots": grouped("."),
    "full-width full stop ．": grouped("\uff0e"),
    "ideographic full stop 。": grouped("。"),
    "katakana middle dot ・": grouped("・"),
    "half-width middle dot ･": grouped("\uff65"),
    "middle dot ·": grouped("\u00b7"),
    "bullet •": grouped("\u2022"),
    "comma": grouped(","),
    "ideographic comma 、": grouped("、"),
    "underscore": grouped("_"),
    "line feed between groups": grouped("\n"),
    "CRLF between groups": grouped("\r\n"),
    "line separator U+2028": grouped("\u2028"),
    "zero-width space inside the digits": lambda n: n[:5] + "\u200b" + n[5:],
    "zero-width space between every digit": lambda n: "\u200b".join(n),
    "zero-width joiner between groups": grouped("\u200d"),
    "word joiner U+2060": grouped("\u2060"),
    "BOM U+FEFF": grouped("\ufeff"),
    "soft hyphen U+00AD": grouped("\u00ad"),
    "hangul filler U+3164": grouped("\u3164"),
    "zero-width space and en dash": grouped("\u200b\u2013\u200b"),
    "full-width digits": fullwidth,
    "full-width digits with U+3000": lambda n: fullwidth(grouped("\u3000")(n)),
    "full-width digits with full-width hyphen": lambda n: fullwidth(grouped("－")(n)),
    "mixed full and half width": lambda n: "".join(fullwidth(c) if i % 2 else c for i, c in enumerate(n)),
    "Arabic-Indic digits": digits_in(0x0660),
    "Devanagari digits": digits_in(0x0966),
    "mathematical bold digits": digits_in(0x1D7CE),
    "keycap emoji digits": lambda n: "".join(c + "\ufe0f\u20e3" for c in n),
    "combining marks on digits": lambda n: "".join(c + "\u0301" for c in n),
    "MN prefix": lambda n: "MN" + n,
    "mn prefix": lambda n: "mn" + n,
    "full-width ＭＮ prefix": lambda n: "ＭＮ" + n,
    "MN prefix and groups": lambda n: "MN" + grouped("-")(n),
    "MN- prefix": lambda n: "MN-" + n,
    "No. prefix": lambda n: "No." + n,
    "ID: prefix": lambda n: "ID:" + n,
    "word prefix": lambda n: "MyNumber" + n,
    "inside Japanese text": lambda n: f"個人番号は{n}です",
    "inside Japanese text, grouped with U+3000": lambda n: f"個人番号：{grouped(chr(0x3000))(n)}（本人確認済み）",
    "in Japanese brackets": lambda n: f"「{n}」",
    "in quotes": lambda n: f'"{n}"',
    "after a stray number": lambda n: "No. 5 " + grouped(" ")(n),
    "before a stray number": lambda n: grouped(" ")(n) + " 7",
    "3-3-3-3": lambda n: "-".join((n[:3], n[3:6], n[6:9], n[9:])),
    "8-4 over a line break": lambda n: n[:8] + "\n" + n[8:],
    "2-5-5 across punctuation": lambda n: n[:2] + "-" + n[2:7] + "." + n[7:],
    "as a decimal": lambda n: n + ".0",
    "at the end of a sentence": lambda n: f"番号 {n}.",
}

# Strings that are not My Numbers, whatever the check digit of the 12-digit runs in them.
PLAIN_VALUES: dict[str, str] = {
    "phone 03-1234-5678": "03-1234-5678",
    "mobile 090-1234-5678": "090-1234-5678",
    "free dial 0120-123-456": "0120-123-456",
    "phone with country code": "+81-3-1234-5678",
    "phone in brackets": "(03) 1234-5678",
    "postal code": "〒100-0001 東京都千代田区",
    "timestamp": "2026-11-23T09:00:00.000000Z",
    "timestamp with a space": "2026-11-23 09:00:00",
    "Japanese date": "2026年11月23日 09:00",
    "epoch milliseconds": "1764000000000",
    "loan id": "loan-20261130-003",
    "agent id": "term-001",
    "amount": "¥1,234,567",
    "version": "1.2.3",
    "11 digits": "09876543210",
    "13 digits": valid() + "5",
}


def _hex_cases(n: str) -> dict[str, str]:
    """Machine tokens that hold the valid number and must still not be refused."""
    return {
        "hex digest, digits in the middle": f"deadbeef{n}cafe" + "0" * 44,
        "hex digest, digits at the end after hex": "7f3a9c0b" * 6 + "ab" + n[:-2] + n[-2:],
        "hex digest, digits at the start": n + "ab" + "c0ffee" * 8,
        "hex digest, letters then digits after a digit": "0a" * 20 + "9f" + n,
        "UUID with digits in the middle groups": f"abcdef01-{n[:4]}-{n[4:8]}-{n[8:]}-abcdef012345",
        "UUID with digits in the last group": f"abcdef01-abcd-4bcd-8bcd-{n}",
        "hyphenless UUID": "abcdef" + n + "abcdef0123456",
        "base64 with digits between letters": "Qk" + n + "Zw==",
    }


def _valid_ip() -> str:
    """An IPv4 address whose 12 digits happen to carry a valid check digit."""
    for c in range(100, 256):
        for d in range(100, 256):
            digits = f"192168{c}{d}"
            if mynumber.is_my_number(digits):
                return f"192.168.{c}.{d}"
    raise AssertionError("no such address")


# --- the corpus --------------------------------------------------------------------------------------


@pytest.mark.parametrize("notation", sorted(NOTATIONS))
def test_notation_of_a_valid_number_is_found_gated_and_redacted(notation: str) -> None:
    text = NOTATIONS[notation](valid())
    assert mynumber.contains_my_number(text), notation
    assert list(mynumber.find_my_numbers({"note": text})) == ["$.note"]
    for ascii_only in (False, True):
        # The cheap gate sees the serialised document, escapes and all: it must never miss.
        assert mynumber.may_contain_my_number(json.dumps({"note": text}, ensure_ascii=ascii_only)), notation
    redacted = mynumber.redact(text)
    assert mynumber.REDACTED in redacted
    assert not mynumber.contains_my_number(redacted)
    assert valid() not in "".join(c for c in mynumber.fold(redacted) if c.isdigit())


@pytest.mark.parametrize("notation", sorted(NOTATIONS))
def test_notation_of_a_wrong_check_digit_is_not_a_my_number(notation: str) -> None:
    text = NOTATIONS[notation](wrong())
    assert not mynumber.contains_my_number(text), notation
    assert mynumber.redact(text) == text


@pytest.mark.parametrize("name", sorted(PLAIN_VALUES))
def test_ordinary_values_are_not_my_numbers(name: str) -> None:
    assert not mynumber.contains_my_number(PLAIN_VALUES[name]), name
    assert list(mynumber.find_my_numbers({"v": PLAIN_VALUES[name]})) == []


@pytest.mark.parametrize("name", sorted(_hex_cases("0" * 12)))
def test_machine_tokens_holding_a_valid_number_are_left_alone(name: str) -> None:
    # The documented trade-off: a 12-digit run that is part of a hex/base64/UUID token is not flagged.
    text = _hex_cases(valid())[name]
    assert valid() in text.replace("-", "")
    assert not mynumber.contains_my_number(text), name


def test_ipv4_addresses_are_not_my_numbers() -> None:
    address = _valid_ip()
    assert mynumber.is_my_number(address.replace(".", ""))
    assert not mynumber.contains_my_number(address)
    assert not mynumber.contains_my_number(f"from {address} and 10.0.0.1")
    # 123.456… is no address: four 3-digit groups are a My Number like any other grouping.
    assert mynumber.contains_my_number(".".join(valid()[i : i + 3] for i in range(0, 12, 3)))


@pytest.mark.parametrize(
    ("value", "paths"),
    [
        (int(valid()), ["$"]),
        (-int(valid()), ["$"]),
        (float(int(valid())), ["$"]),
        (int(valid(ZERO_PREFIX)), ["$"]),  # "0987…" lost its leading zero on the way
        (int(wrong()), []),
        (int(wrong(ZERO_PREFIX)), []),
        (1764000000000, []),
        ({valid(): 1}, ["$.<key>"]),
        ({"a": {grouped("ー")(valid()): {"b": 1}}}, ["$.a.<key>"]),
        ({"a": [1, {"b": int(valid())}]}, ["$.a[1].b"]),
        ({"a": [valid(ZERO_PREFIX)]}, ["$.a[0]"]),
        ({"a": "09876543210"}, []),  # an 11-digit string is a phone number, not a lost leading zero
        ([True, None, 1.5, "x"], []),
    ],
)
def test_json_values_integers_and_keys(value: Any, paths: list[str]) -> None:
    assert list(mynumber.find_my_numbers(value)) == paths
    assert valid() not in json.dumps(mynumber.redact(value))
    if paths and isinstance(value, dict):
        assert mynumber.may_contain_my_number(json.dumps(value))


def test_paths_and_refusals_never_show_the_number() -> None:
    doc = {valid(): {"inner": valid()}, "x": [grouped("\u3000")(valid())]}
    paths = list(mynumber.find_my_numbers(doc))
    assert paths == ["$.<key>", "$.<key>.inner", "$.x[0]"]
    with pytest.raises(mynumber.MyNumberFound) as info:
        mynumber.refuse_my_numbers(doc, what="test")
    message = str(info.value)
    assert info.value.paths == paths
    assert not mynumber.contains_my_number(message) and valid()[:8] not in message


def test_plain_ranges_need_no_folding() -> None:
    # fold() skips text whose non-ASCII characters all lie in PLAIN_RANGES; that is only right if
    # every one of them reads as "other" (neither digit, ASCII letter nor separator) and never vanishes.
    for first, last in mynumber.PLAIN_RANGES:
        for codepoint in range(first, last + 1):
            folded = mynumber.fold_char(chr(codepoint))
            assert folded and not any(c.isascii() for c in folded), hex(codepoint)


def test_text_only_of_plain_characters_is_still_checked() -> None:
    assert mynumber.contains_my_number(f"個人番号{valid()}番")
    assert not mynumber.contains_my_number("年末調整の書類を確認しました")


separators = st.sampled_from(
    ["", " ", "-", "\u3000", "\u2013", "ー", "\u2212", "\u00a0", " - ", ".", "・", "\u200b", "\n", "\t", ",", "_"]
)
noise = st.text(st.sampled_from("aZ09 -_.,\n\u3000ー０９ＭＮ番号\u200b\\\"'"), max_size=6)


@settings(max_examples=400, deadline=None)
@given(noise, separators, separators, noise, st.booleans(), st.booleans())
def test_gate_never_misses_what_the_precise_check_finds(
    before: str, sep1: str, sep2: str, after: str, use_valid: bool, ascii_only: bool
) -> None:
    number = valid() if use_valid else wrong()
    text = f"{before}{number[:4]}{sep1}{number[4:8]}{sep2}{number[8:]}{after}"
    serialised = json.dumps({"k": text, text: [text]}, ensure_ascii=ascii_only)
    if mynumber.contains_my_number(text):
        assert mynumber.may_contain_my_number(serialised)
        assert not mynumber.contains_my_number(mynumber.redact(text))
    if use_valid and not (before[-1:].isalnum() and before[-1:].isascii()) and not after[:1].isalpha():
        # Nothing touching the digits that could make them part of a token: always found.
        assert mynumber.contains_my_number(text) or any(c.isdigit() for c in before + after)


# --- every field of every message ---------------------------------------------------------------


@pytest.fixture(scope="module")
def key() -> Any:
    return signing.generate_key()


def _event(key: Any, **changes: Any) -> bytes:
    body: dict[str, Any] = {
        "v": 1,
        "agent": "term-001",
        "seq": 1,
        "id": "0" * 32,
        "type": "test.synthetic",
        "at": timefmt.fmt(timefmt.now()),
        "clock": {"synced": True, "offset_ms": -3},
        "payload": {"n": 1, "note": "ok"},
    }
    body.update(changes)
    return canonical.canonical_bytes({"event": body, "sig": signing.sign(key, "event", body)})


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        (lambda n: {"clock": {"synced": True, "offset_ms": int(n)}}, "$.clock.offset_ms"),
        (lambda n: {"clock": {"synced": True, "offset_ms": -int(n)}}, "$.clock.offset_ms"),
        (lambda n: {"id": "abcdefabcdefabcdefab" + n}, "$.id"),
        (lambda n: {"agent": "term-" + n}, "$.agent"),
        (lambda n: {"seq": int(n)}, "$.seq"),
        (lambda n: {"payload": {"n": 1, "note": grouped("\u3000")(n)}}, "$.payload.note"),
        (lambda n: {"payload": {"n": 1, "note": "MN" + n}}, "$.payload.note"),
    ],
)
def test_every_event_field_is_scanned(key: Any, changes: Callable[[str], dict[str, Any]], field: str) -> None:
    raw = _event(key, **changes(valid()))
    with pytest.raises(errors.Rejected) as info:
        events.decode_event(raw)
    assert info.value.reason == errors.MY_NUMBER
    assert info.value.detail == f"field {field} looks like a My Number"
    # The same fields with a wrong check digit pass.
    events.decode_event(_event(key, **changes(wrong())))


def test_agent_refuses_to_build_an_event_with_a_my_number_in_the_header(key: Any) -> None:
    with pytest.raises(errors.Rejected) as info:
        events.build_event(
            key, agent="term-001", seq=1, type="test.synthetic", payload={"n": 1}, clock_offset_ms=int(valid())
        )
    assert info.value.reason == errors.MY_NUMBER


def _heartbeat(key: Any, **changes: Any) -> bytes:
    fields: dict[str, Any] = {
        "agent": "term-001",
        "at": timefmt.fmt(timefmt.now()),
        "version": "0.1.0",
        "boot_id": "0" * 32,
        "outbox_depth": 0,
        "next_seq": 1,
        "policy_state": "valid",
    }
    fields.update(changes)
    return messages.build_heartbeat(key, **fields)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        (lambda n: {"version": "MN" + n}, "version"),
        (lambda n: {"version": grouped("ー")(n)}, "version"),
        (lambda n: {"clock_offset_ms": int(n)}, "clock_offset_ms"),
        (lambda n: {"outbox_depth": int(n)}, "outbox_depth"),
        (lambda n: {"policy_state": fullwidth(n)}, "policy_state"),
        (lambda n: {"boot_id": "abcdefabcdefabcdefab" + n}, "boot_id"),
    ],
)
def test_every_heartbeat_field_is_scanned(key: Any, changes: Callable[[str], dict[str, Any]], field: str) -> None:
    raw = _heartbeat(key, **changes(valid()))
    with pytest.raises(errors.Rejected) as info:
        messages.open_heartbeat(raw, key.public_key(), "term-001")
    assert info.value.reason == errors.MY_NUMBER
    assert info.value.detail == f"heartbeat field $.heartbeat.{field} looks like a My Number"
    # A wrong check digit is fine.
    messages.open_heartbeat(_heartbeat(key, **changes(wrong())), key.public_key(), "term-001")


def test_a_command_never_carries_a_my_number(key: Any) -> None:
    with pytest.raises(mynumber.MyNumberFound) as info:
        messages.build_command(key, agent="door-1", name="door.unlock", args={"door": "d1", "requested_by": valid()})
    assert info.value.paths == ["$.args.requested_by"]
    messages.build_command(key, agent="door-1", name="door.unlock", args={"door": "d1", "requested_by": wrong()})
