"""Detect values that look like a My Number (個人番号) so they can be refused before storage.

A My Number is 12 digits whose last digit is a check digit over the first 11 (the formula of the
ordinance under the My Number Act). Synthetic 12-digit numbers with a wrong check digit pass; anything
with a valid one is treated as a My Number, because false refusals are cheap and a stored one is not.

This module is the one guard every door uses (events, heartbeats, commands, site policy, the admin API
and CLI). How a text is read (docs/protocol.md, "My Numbers"):

1. **Folding**, character by character: NFKC (full-width digits and letters, ideographic space, ｰ, ．…),
   then every Unicode decimal digit becomes its ASCII digit; every space (Zs, Zl, Zp, tab, line breaks),
   control (Cc) and format character (Cf: zero-width space/joiners, word joiner, BOM, soft hyphen, bidi
   marks) and the blank fillers (U+115F, U+1160, U+3164, U+FFA0, U+2800) become a space; every dash,
   hyphen and minus (Pd, U+2212, U+30FC ー, U+2043, U+02D7, U+2796…) a ``-``; dots (``.``, ・, 。, ·, •…)
   a ``.``; commas (``,``, 、) a ``,``; combining marks (Mn, Me: variation selectors, the keycap) vanish.
2. **Digit groups**: runs of ASCII digits joined by separators (space, control, ``-``, ``.``, ``,``,
   ``_``), in any number and length: a My Number is any run of whole groups that adds up to exactly 12
   digits (4-4-4, 12, 8-4, 3-3-3-3, "MN 1234 5678 9018", "No.1234・5678・9018"…).
3. **Machine tokens are left alone**: a group touching an ASCII letter on its right (``…9018ab``), or
   one whose letters on its left follow a digit (``…7f3a123456789018``), is part of a hex digest,
   base64 string or id, and is not a digit group. Letters alone before the digits are a prefix and do
   not protect (``MN123456789018``, ``ID123456789018``). UUIDs (8-4-4-4-12 hex with a letter) and IPv4
   dotted quads are masked before grouping.

Integers (JSON numbers, YAML ints, integral floats) count when they have 12 digits, or 11 (a My Number
starting with 0 that lost its zero, e.g. through a spreadsheet); the sign is ignored.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterator
from typing import Any

from sekisho.common.i18n import M_

REDACTED = "[REDACTED:my_number]"

# --- folding ---------------------------------------------------------------------------------------

# Characters outside Zs/Cf/Pd that people (or attackers) use as blanks, dashes, dots or commas.
_BLANKS = frozenset("\u115f\u1160\u3164\uffa0\u2800\u180e")
_DASHES = frozenset("\u2212\u30fc\uff70\u2043\u02d7\u2796\u207b\u208b\u2e3a\u2e3b\ufe63\uff0d")
_DOTS = frozenset(".\u30fb\uff65\u3002\uff61\uff0e\u00b7\u0387\u2022\u2027\u2219\u22c5\u2024\ufe52\u2e31")
_COMMAS = frozenset(",\u3001\uff64\uff0c\ufe50\ufe51")
# The ASCII separators after folding. "_" joins digit groups too (123_456_789_018).
_SEP = r"\x00-\x1f\x7f ,\-._"
# A bounded cache: folded characters of ordinary text are looked up in C; hostile text with very many
# distinct characters is still folded correctly, only more slowly.
_CACHE_LIMIT = 65_536


def fold_char(ch: str) -> str:
    """Return what one character reads as for the guard (see the module docstring)."""
    if ch.isascii():
        return ch
    category = unicodedata.category(ch)
    if ch in _BLANKS or ch.isspace() or category in ("Zs", "Zl", "Zp", "Cc", "Cf"):
        return " "
    if ch in _DASHES or category == "Pd":
        return "-"
    if ch in _DOTS:
        return "."
    if ch in _COMMAS:
        return ","
    if category in ("Mn", "Me"):
        return ""
    decimal = unicodedata.decimal(ch, None)
    if decimal is not None:
        return str(decimal)
    compat = unicodedata.normalize("NFKC", ch)
    if compat == ch:
        return ch
    return "".join(fold_char(c) for c in compat)


class _FoldTable(dict[int, str]):
    """str.translate table that folds each character on first sight and remembers it."""

    def __missing__(self, codepoint: int) -> str:
        folded = fold_char(chr(codepoint))
        if len(self) < _CACHE_LIMIT:
            self[codepoint] = folded
        return folded


_TABLE = _FoldTable()


# Characters that fold to themselves and read as neither digit, letter nor separator (kana, kanji,
# hangul, Japanese brackets): text holding nothing else outside ASCII needs no folding, which keeps the
# per-event gate cheap for Japanese payloads. tests/test_mynumber.py checks every one of them.
PLAIN_RANGES = (
    (0x3005, 0x3005),
    (0x300C, 0x3011),
    (0x3041, 0x3096),
    (0x30A1, 0x30FA),
    (0x30FD, 0x30FE),
    (0x4E00, 0x9FFF),
    (0xAC00, 0xD7A3),
)
_NON_ASCII = re.compile("[^\\x00-\\x7f]+")
_NEEDS_FOLDING = re.compile(
    "[^\\x00-\\x7f" + "".join(f"{re.escape(chr(a))}-{re.escape(chr(b))}" for a, b in PLAIN_RANGES) + "]"
)


def fold(text: str) -> str:
    """Return text as the guard reads it: ASCII digits, ASCII letters, ASCII separators and the rest."""
    if text.isascii() or _NEEDS_FOLDING.search(text) is None:
        return text
    return _NON_ASCII.sub(_fold_run, text)


def _fold_run(match: re.Match[str]) -> str:
    return match.group(0).translate(_TABLE)


def _fold_with_origin(text: str) -> tuple[str, list[int]]:
    """Fold text and tell, for each folded character, the index of the character it came from."""
    if text.isascii():
        return text, list(range(len(text)))
    pieces: list[str] = []
    origin: list[int] = []
    for index, ch in enumerate(text):
        piece = _TABLE[ord(ch)]
        pieces.append(piece)
        origin.extend([index] * len(piece))
    return "".join(pieces), origin


# --- digit groups ----------------------------------------------------------------------------------

_RUN = re.compile(rf"[0-9]+(?:[{_SEP}]+[0-9]+)*")
_GROUP = re.compile(r"[0-9]+")
_LETTERS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
_DIGITS = frozenset("0123456789")
_HEX = "[0-9A-Fa-f]"
_UUID = re.compile(rf"(?<![0-9A-Za-z]){_HEX}{{8}}-{_HEX}{{4}}-{_HEX}{{4}}-{_HEX}{{4}}-{_HEX}{{12}}(?![0-9A-Za-z])")
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
_IPV4 = re.compile(rf"(?<![0-9A-Za-z.]){_OCTET}(?:\.{_OCTET}){{3}}(?![0-9A-Za-z]|\.[0-9])")
# The cheap gate: 11 digits with nothing but separators between them. Every window the precise scan
# can find (12 digits) and every integer it checks (11 or 12 digits) contains such a stretch. Done on
# bytes, in C: separators deleted, digits made "0", everything else "x", then a substring search.
_GATE_TABLE = bytes(0x30 if 0x30 <= i <= 0x39 else 0x78 for i in range(256))
_GATE_DELETE = bytes([*range(0x20), 0x7F, 0x20, 0x2C, 0x2D, 0x2E, 0x5F])
_GATE_RUN = b"0" * 11
_JSON_ESCAPE = re.compile(r"\\(?:u([0-9a-fA-F]{4})|(.))", re.DOTALL)
_SURROGATE = re.compile("[\ud800-\udfff]")
_JSON_SIMPLE = {"n": "\n", "r": "\r", "t": "\t", "b": "\b", "f": "\f"}


def _gate(folded: str) -> bool:
    """Tell whether folded text has 11 digits with only separators between them."""
    squeezed = folded.encode("utf-8", "surrogatepass").translate(_GATE_TABLE, _GATE_DELETE)
    return _GATE_RUN in squeezed


def _masked(match: re.Match[str]) -> str:
    return "#" * len(match.group(0))


def _mask_uuid(match: re.Match[str]) -> str:
    # An all-digit "UUID" is more likely something else: only mask the ones with a hex letter.
    text = match.group(0)
    return "#" * len(text) if any(c in _LETTERS for c in text) else text


def _windows(folded: str) -> Iterator[tuple[int, int, str]]:
    """Yield (start, end, digits) of every run of whole digit groups holding exactly 12 digits."""
    text = folded
    if "-" in text:
        text = _UUID.sub(_mask_uuid, text)
    if "." in text:
        text = _IPV4.sub(_masked, text)
    for run in _RUN.finditer(text):
        groups = [(m.start(), m.end()) for m in _GROUP.finditer(text, run.start(), run.end())]
        start = run.start()
        left = start
        while left > 0 and text[left - 1] in _LETTERS:
            left -= 1
        if left < start and left > 0 and text[left - 1] in _DIGITS:
            groups = groups[1:]  # letters after a digit: the end of a hex or base64 token
        if run.end() < len(text) and text[run.end()] in _LETTERS:
            groups = groups[:-1]  # digits running into letters: the start of such a token
        for first in range(len(groups)):
            total = 0
            for last in range(first, len(groups)):
                total += groups[last][1] - groups[last][0]
                if total >= 12:
                    break
            if total == 12:
                yield groups[first][0], groups[last][1], "".join(text[a:b] for a, b in groups[first : last + 1])


# --- the checks ------------------------------------------------------------------------------------


def check_digit(first11: str) -> int:
    """Return the check digit for the first 11 digits of a My Number."""
    if len(first11) != 11 or not first11.isdigit():
        raise ValueError("need exactly 11 digits")
    total = 0
    for n in range(1, 12):
        p = int(first11[11 - n])
        q = n + 1 if n <= 6 else n - 5
        total += p * q
    remainder = total % 11
    return 0 if remainder <= 1 else 11 - remainder


def is_my_number(digits: str) -> bool:
    """Tell whether a 12-digit string (any Unicode digits) carries a valid My Number check digit."""
    digits = fold(digits)
    if len(digits) != 12 or not digits.isascii() or not digits.isdigit():
        return False
    return check_digit(digits[:11]) == int(digits[11])


def _number_is_my_number(value: int | float) -> bool:
    if isinstance(value, float):
        if not value.is_integer():
            return False
        value = int(value)
    magnitude = abs(value)
    return 10**10 <= magnitude < 10**12 and is_my_number(str(magnitude).zfill(12))


def _unescape_json(text: str) -> str:
    def one(match: re.Match[str]) -> str:
        if match.group(1) is not None:
            return chr(int(match.group(1), 16))
        return _JSON_SIMPLE.get(match.group(2), match.group(2))

    text = _JSON_ESCAPE.sub(one, text)
    if _SURROGATE.search(text):
        # "\ud835\udfd7" is one character (a mathematical digit): join escaped surrogate pairs.
        text = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "surrogatepass")
    return text


def may_contain_my_number(serialised: str) -> bool:
    """Tell cheaply whether a serialised JSON document could contain a My Number anywhere (no false negatives).

    Folding is per character, so the folded document holds every folded string of the parsed one (JSON
    escapes decoded first): whatever ``find_my_numbers`` finds in it passes this gate too.
    """
    if "\\" in serialised:
        serialised = _unescape_json(serialised)
    return _gate(fold(serialised))


def contains_my_number(text: str) -> bool:
    """Tell whether a string contains something that looks like a My Number."""
    folded = fold(text)
    if not _gate(folded):
        return False
    return any(is_my_number(digits) for _, _, digits in _windows(folded))


def _key_label(key: Any) -> str | None:
    """Return "<key>" for a mapping key that itself looks like a My Number, else None."""
    if isinstance(key, str):
        return "<key>" if contains_my_number(key) else None
    if isinstance(key, int | float) and not isinstance(key, bool):
        return "<key>" if _number_is_my_number(key) else None
    return None


def find_my_numbers(value: Any, path: str = "$") -> Iterator[str]:
    """Yield the JSON paths of every field (or key) that looks like a My Number; paths never show one."""
    if isinstance(value, bool):
        return
    if isinstance(value, int | float):
        if _number_is_my_number(value):
            yield path
    elif isinstance(value, str):
        if contains_my_number(value):
            yield path
    elif isinstance(value, dict):
        for key, item in value.items():
            label = _key_label(key)
            if label is not None:
                yield f"{path}.{label}"
            yield from find_my_numbers(item, f"{path}.{label or key}")
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            yield from find_my_numbers(item, f"{path}[{index}]")


class MyNumberFound(ValueError):
    """A value holds something that looks like a My Number; the message names where, never the value."""

    def __init__(self, paths: list[str], what: str = "") -> None:
        self.paths = paths
        where = ", ".join(paths)
        prefix = f"{what}: " if what else ""
        super().__init__(
            M_(
                "%(where)s: looks like a My Number (12 digits with a valid check digit); refused, value not shown",
                where=f"{prefix}{where}",
            )
        )


def refuse_my_numbers(value: Any, path: str = "$", *, what: str = "") -> None:
    """Raise MyNumberFound naming every field of value that looks like a My Number."""
    found = list(find_my_numbers(value, path))
    if found:
        raise MyNumberFound(found, what)


def _redact_text(text: str) -> str:
    folded, origin = _fold_with_origin(text)
    if not _gate(folded):
        return text
    spans: list[list[int]] = []
    for start, end, digits in _windows(folded):
        if not is_my_number(digits):
            continue
        first, last = origin[start], origin[end - 1] + 1
        while last < len(text) and not _TABLE[ord(text[last])]:
            last += 1  # the combining marks on the last digit go with it
        if spans and first <= spans[-1][1]:
            spans[-1][1] = max(spans[-1][1], last)
        else:
            spans.append([first, last])
    if not spans:
        return text
    out: list[str] = []
    at = 0
    for first, last in spans:
        out.append(text[at:first])
        out.append(REDACTED)
        at = last
    out.append(text[at:])
    redacted = "".join(out)
    # Belt and braces: whatever the span mapping missed, the whole string goes.
    return REDACTED if contains_my_number(redacted) else redacted


def redact(value: Any) -> Any:
    """Return a copy of a JSON value with every My-Number-like string or number replaced."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return REDACTED if _number_is_my_number(value) else value
    if isinstance(value, str):
        return _redact_text(value)
    if isinstance(value, dict):
        return {redact(k) if isinstance(k, str) else k: redact(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(item) for item in value]
    return value
