"""Detect values that look like a My Number (個人番号) so they can be refused before storage.

A My Number is 12 digits whose last digit is a check digit over the first 11 (the formula of the
ordinance under the My Number Act). Synthetic 12-digit numbers with a wrong check digit pass; anything
with a valid one is treated as a My Number, because false refusals are cheap and a stored one is not.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

# 12 digits (ASCII or full-width), optionally grouped 4-4-4 by a hyphen or space. The run must not
# touch other ASCII letters or digits: hex digests and UUIDs contain 12-digit runs by chance, and
# flagging them would dead-letter ordinary events; Japanese text around a number is still caught.
_D = "0-9０-９"
_SEP = "[- ‐－]?"
_CANDIDATE = re.compile(rf"(?<![{_D}A-Za-z])([{_D}]{{4}}){_SEP}([{_D}]{{4}}){_SEP}([{_D}]{{4}})(?![{_D}A-Za-z])")
# The same digit groups with no boundary checks: a cheap gate over a whole serialised message. If it
# finds nothing, no field can hold a My Number; if it finds something, the precise walk decides.
_PREFILTER = re.compile(rf"[{_D}]{{4}}{_SEP}[{_D}]{{4}}{_SEP}[{_D}]{{4}}")
_FULLWIDTH = str.maketrans("０１２３４５６７８９", "0123456789")


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
    """Tell whether a 12-digit string carries a valid My Number check digit."""
    digits = digits.translate(_FULLWIDTH)
    if len(digits) != 12 or not digits.isascii() or not digits.isdigit():
        return False
    return check_digit(digits[:11]) == int(digits[11])


def may_contain_my_number(serialised: str) -> bool:
    """Tell cheaply whether a serialised JSON document could contain a My Number anywhere (no false negatives)."""
    return _PREFILTER.search(serialised) is not None


def contains_my_number(text: str) -> bool:
    """Tell whether a string contains something that looks like a My Number."""
    return any(is_my_number("".join(m.groups())) for m in _CANDIDATE.finditer(text))


def find_my_numbers(value: Any, path: str = "$") -> Iterator[str]:
    """Yield the JSON paths of every field (or key) in a JSON value that looks like a My Number."""
    if isinstance(value, bool):
        return
    if isinstance(value, int):
        if 10**11 <= value < 10**12 and is_my_number(str(value)):
            yield path
    elif isinstance(value, str):
        if contains_my_number(value):
            yield path
    elif isinstance(value, dict):
        for key, item in value.items():
            if isinstance(key, str) and contains_my_number(key):
                yield f"{path}.<key>"
            yield from find_my_numbers(item, f"{path}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from find_my_numbers(item, f"{path}[{index}]")


def redact(value: Any) -> Any:
    """Return a copy of a JSON value with every My-Number-like string or number replaced."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return "[REDACTED:my_number]" if 10**11 <= value < 10**12 and is_my_number(str(value)) else value
    if isinstance(value, str):
        return _CANDIDATE.sub(
            lambda m: "[REDACTED:my_number]" if is_my_number("".join(m.groups())) else m.group(0), value
        )
    if isinstance(value, dict):
        return {redact(k) if isinstance(k, str) else k: redact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(item) for item in value]
    return value
