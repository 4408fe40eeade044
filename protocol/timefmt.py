"""Timestamps on the wire: UTC, ISO 8601 with microseconds and a trailing Z."""

from __future__ import annotations

from datetime import UTC, datetime

from sekisho.protocol import errors


def now() -> datetime:
    """Return the current time in UTC."""
    return datetime.now(UTC)


def fmt(moment: datetime) -> str:
    """Format an aware datetime for the wire."""
    if moment.tzinfo is None:
        raise ValueError("naive datetime on the wire")
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse(text: object, field: str = "timestamp") -> datetime:
    """Parse a wire timestamp, raising Rejected for anything not UTC ISO 8601 with a Z."""
    if not isinstance(text, str) or not text.endswith("Z") or len(text) > 40:
        raise errors.Rejected(errors.SCHEMA, f"{field} must be an ISO 8601 UTC string ending in Z")
    try:
        return datetime.fromisoformat(text[:-1] + "+00:00")
    except ValueError as err:
        raise errors.Rejected(errors.SCHEMA, f"{field} is not ISO 8601") from err
