"""Canonical JSON: the exact bytes that are signed.

Keys sorted, no insignificant whitespace, UTF-8, and no floating-point numbers anywhere, because
float formatting differs between implementations and would make a signature unverifiable elsewhere.
"""

from __future__ import annotations

import json
import re
from typing import Any

from sekisho.protocol import errors

_PLAIN = (str, int, bool, type(None))


def _reject_floats(value: Any) -> None:
    """Raise Rejected at the first float or non-string key; one flat pass (bundles hold ~1,000 nodes each)."""
    stack = [value]
    pop, push = stack.pop, stack.extend
    while stack:
        item = pop()
        kind = type(item)
        if kind is dict:
            if not all(type(key) is str for key in item):
                break
            push(item.values())
        elif kind is list:
            push(item)
        elif kind not in _PLAIN and isinstance(item, (float, dict, list)):
            break  # a float, or a subclass to look at the slow way
    else:
        return
    _find_float(value)


def _find_float(value: Any, path: str = "$") -> None:
    """The slow walk that names where the offending value is."""
    if isinstance(value, float):
        raise errors.Rejected(errors.SCHEMA, f"floating-point number at {path}; use integers")
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise errors.Rejected(errors.SCHEMA, f"non-string key at {path}")
            _find_float(item, f"{path}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _find_float(item, f"{path}[{index}]")


def canonical_bytes(value: Any) -> bytes:
    """Serialise a JSON value to its canonical signed form."""
    _reject_floats(value)
    return canonical_bytes_parsed(value)


def canonical_bytes_parsed(value: Any) -> bytes:
    """Serialise a value that came from loads_strict (which already refused floats) canonically."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


class _FloatFound(ValueError):
    pass


# Deeper than any message of ours (an event is four levels deep, a policy bundle about eight). Every
# later step (schema checks, the My Number walk, canonical serialisation) recurses, so a document
# nested hundreds of levels deep would otherwise fail there with RecursionError instead of here.
MAX_DEPTH = 32
# A lone surrogate can only come from a \uD800-\uDFFF escape (UTF-8 itself cannot carry one); it parses
# but cannot be encoded back to UTF-8, so the signature check and storage would fail on it.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _check_shape(value: Any, raw: bytes) -> None:
    """Refuse nesting deeper than MAX_DEPTH and strings holding lone surrogates."""
    # Cheap gates first: the usual event has a handful of brackets and no surrogate escapes at all.
    deep = raw.count(b"{") + raw.count(b"[") > MAX_DEPTH
    surrogates = _SURROGATE_ESCAPE.search(raw) is not None
    if not (deep or surrogates):
        return
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if surrogates and _SURROGATE.search(item):
                raise errors.Rejected(errors.MALFORMED, "string holds a lone surrogate (not encodable as UTF-8)")
            continue
        if not isinstance(item, dict | list):
            continue
        if depth > MAX_DEPTH:
            raise errors.Rejected(errors.MALFORMED, f"nested deeper than {MAX_DEPTH} levels")
        children = [*item.keys(), *item.values()] if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children)


def loads_strict(raw: bytes, *, max_size: int) -> Any:
    """Parse JSON from the wire with a size limit; any failure becomes a Rejected with a reason.

    Besides syntax, this refuses floats, non-standard constants, duplicate object keys, nesting deeper
    than MAX_DEPTH and lone surrogates, so whatever it returns can be walked, checked and re-serialised
    to UTF-8 without raising anything but Rejected.
    """
    if len(raw) > max_size:
        raise errors.Rejected(errors.TOO_LARGE, f"{len(raw)} bytes > limit {max_size}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise errors.Rejected(errors.MALFORMED, f"not UTF-8 at byte {err.start}") from err
    try:
        value = json.loads(
            text, parse_constant=_no_constants, parse_float=_no_floats, object_pairs_hook=_no_duplicate_keys
        )
    except _FloatFound as err:
        raise errors.Rejected(errors.SCHEMA, "floating-point number; use integers") from err
    except _DuplicateKey as err:
        # Parsers disagree on which of two equal keys wins; a signature over one reading must not let a
        # reader of the other see different content.
        raise errors.Rejected(errors.MALFORMED, f"duplicate object key {str(err)[:64]!r}") from err
    except (ValueError, RecursionError) as err:
        raise errors.Rejected(errors.MALFORMED, f"not JSON: {str(err)[:120]}") from err
    _check_shape(value, raw)
    return value


class _DuplicateKey(ValueError):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return result


def _no_floats(text: str) -> Any:
    # Refused while parsing, so everything loads_strict returns is float-free and re-serialises canonically.
    raise _FloatFound(text)


def _no_constants(name: str) -> Any:
    raise ValueError(f"non-standard constant {name}")
