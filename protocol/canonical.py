"""Canonical JSON: the exact bytes that are signed.

Keys sorted, no insignificant whitespace, UTF-8, and no floating-point numbers anywhere, because
float formatting differs between implementations and would make a signature unverifiable elsewhere.
"""

from __future__ import annotations

import json
from typing import Any

from sekisho.protocol import errors


def _reject_floats(value: Any, path: str = "$") -> None:
    if isinstance(value, float):
        raise errors.Rejected(errors.SCHEMA, f"floating-point number at {path}; use integers")
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise errors.Rejected(errors.SCHEMA, f"non-string key at {path}")
            _reject_floats(item, f"{path}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _reject_floats(item, f"{path}[{index}]")


def canonical_bytes(value: Any) -> bytes:
    """Serialise a JSON value to its canonical signed form."""
    _reject_floats(value)
    return canonical_bytes_parsed(value)


def canonical_bytes_parsed(value: Any) -> bytes:
    """Serialise a value that came from loads_strict (which already refused floats) canonically."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


class _FloatFound(ValueError):
    pass


def loads_strict(raw: bytes, *, max_size: int) -> Any:
    """Parse JSON from the wire with a size limit; any failure becomes a Rejected with a reason."""
    if len(raw) > max_size:
        raise errors.Rejected(errors.TOO_LARGE, f"{len(raw)} bytes > limit {max_size}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise errors.Rejected(errors.MALFORMED, f"not UTF-8 at byte {err.start}") from err
    try:
        return json.loads(text, parse_constant=_no_constants, parse_float=_no_floats)
    except _FloatFound as err:
        raise errors.Rejected(errors.SCHEMA, "floating-point number; use integers") from err
    except (ValueError, RecursionError) as err:
        raise errors.Rejected(errors.MALFORMED, f"not JSON: {str(err)[:120]}") from err


def _no_floats(text: str) -> Any:
    # Refused while parsing, so everything loads_strict returns is float-free and re-serialises canonically.
    raise _FloatFound(text)


def _no_constants(name: str) -> Any:
    raise ValueError(f"non-standard constant {name}")
