"""Rows, columns and pages of a register or timeline, and the opaque keyset cursor between pages.

A page is a window of rows in a fixed order, newest first; the next page starts strictly after the last
row shown, by its sort key, never by an offset. So a row stored while someone reads page 1 never shifts
page 2 (it lands before page 1 if it is newer, or in its place further on if it happened earlier), and
reading deep pages costs what reading the first does.

The sort key of a row is (segment, time, rank, id): the segment groups rows that a register shows first
(the key register: overdue, then out, then returned), rank orders the sources of a timeline that share a
moment, id breaks the last ties. The cursor carries that key, and the moment the first page was read
(``as_of``) so that "overdue" means the same on every page of one reading. It is base64url JSON: opaque
to its users, not a secret; one that does not decode into that shape is refused with a clear error.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from sekisho.protocol import timefmt

CURSOR_VERSION = 1
MAX_LIMIT = 500


class CursorError(ValueError):
    """A cursor that was not made by this module (or by an older, incompatible version of it)."""


@dataclass(frozen=True, slots=True)
class Ref:
    """Something shown by its name with its id kept for hover and exports (a person: kanji name and kana)."""

    id: str
    name: str
    kana: str | None = None
    known: bool = True

    def text(self) -> str:
        """Return the name as plain text, with the reading in brackets for people: `見本 太郎（みほん たろう）`."""
        if self.kana and self.kana != self.name:
            return f"{self.name}（{self.kana}）"
        return self.name


Value = str | int | bool | datetime | Ref | None
ColumnKind = Literal["text", "time", "ref", "count"]


@dataclass(frozen=True, slots=True)
class Column:
    """One column of a register: its key in a row's values, Japanese and English headings, and kind."""

    key: str
    ja: str
    en: str
    kind: ColumnKind = "text"


@dataclass(frozen=True, slots=True)
class Spec:
    """A register or timeline: its id, titles and columns (in the order the paper form has them)."""

    name: str
    ja: str
    en: str
    columns: tuple[Column, ...]


@dataclass(frozen=True, slots=True)
class SortKey:
    """Where a row sits in its register's order (see the module docstring)."""

    segment: int
    at: datetime | None
    rank: int
    id: int | str


@dataclass(frozen=True, slots=True)
class Row:
    """One row: its values by column key, its sort key, and the agent whose chain holds its source records."""

    key: SortKey
    values: dict[str, Value]
    agents: tuple[str, ...] = ()
    kind: str = ""
    flags: tuple[str, ...] = field(default=())


@dataclass(frozen=True, slots=True)
class Cursor:
    """The decoded cursor: the sort key of the last row shown and when the reading began."""

    after: SortKey
    as_of: datetime


def _time(text: Any) -> datetime | None:
    if text is None:
        return None
    return timefmt.parse(text, "cursor time")


def encode_cursor(cursor: Cursor) -> str:
    """Return the opaque text of a cursor."""
    key = cursor.after
    body = [
        CURSOR_VERSION,
        key.segment,
        None if key.at is None else timefmt.fmt(key.at),
        key.rank,
        key.id,
        timefmt.fmt(cursor.as_of),
    ]
    raw = json.dumps(body, separators=(",", ":"), ensure_ascii=True).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(text: str) -> Cursor:
    """Parse a cursor made by encode_cursor; anything else raises CursorError."""
    bad = CursorError("ページ位置が不正です / invalid page cursor")
    if not isinstance(text, str) or not 0 < len(text) <= 400:
        raise bad
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        body = json.loads(raw)
    except (binascii.Error, ValueError) as err:
        raise bad from err
    if not (isinstance(body, list) and len(body) == 6 and body[0] == CURSOR_VERSION):
        raise bad
    _, segment, at, rank, ident, as_of = body
    if type(segment) is not int or type(rank) is not int or not (0 <= segment < 100 and 0 <= rank < 100):
        raise bad
    if not (type(ident) is int or (isinstance(ident, str) and len(ident) <= 200)):
        raise bad
    if not isinstance(at, str) or not isinstance(as_of, str):
        raise bad
    try:
        return Cursor(SortKey(segment, _time(at), rank, ident), timefmt.parse(as_of, "cursor as_of"))
    except Exception as err:  # timefmt.parse raises Rejected; any malformed time is the same bad cursor
        raise bad from err


def check_limit(limit: int) -> int:
    """Return the page size if it is within 1..MAX_LIMIT, else raise ValueError."""
    if not 1 <= limit <= MAX_LIMIT:
        raise ValueError(f"件数は1〜{MAX_LIMIT}で指定してください / limit must be 1..{MAX_LIMIT}")
    return limit


def check_id(key: SortKey, numeric: bool) -> None:
    """Refuse a cursor whose id is not of the kind the segment's id column holds (text vs number)."""
    if numeric != (type(key.id) is int) or key.at is None:
        raise CursorError("ページ位置が不正です / invalid page cursor")
