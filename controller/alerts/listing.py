"""Reading the alert book for people and programs: filters, keyset pages, one alert with its events and history,
the changes the live streams send, and the status board's figures.

The console's pages (controller/console/alerts_web.py) and the JSON API (controller/api/alerts.py) read through
these functions, so a filter means the same on a page, in JSON and on a stream. Every query is bounded: a page
by its limit (at most 500), an alert's events by what the book keeps, its history and each stream round by caps
of their own.

Order: alerts not resolved first (open and acknowledged), then by severity, then the newest last occurrence;
the keyset cursor carries that sort key, so a page never shifts when other alerts change while someone reads.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Final, cast

from sqlalchemy import ColumnElement, Connection, Table, and_, case, func, or_, select

from sekisho.controller.alerts.book import ALERT_EVENTS, ALERTS, EVENTS_KEPT, AlertRefused
from sekisho.controller.alerts.rules import RULES
from sekisho.controller.store.models import AdminAuditEntry, Event
from sekisho.controller.store.store import Store
from sekisho.protocol import timefmt
from sekisho.protocol.alert_policy import AlertSettings
from sekisho.protocol.policy import SitePolicy

_EVENTS = cast(Table, Event.__table__)
_AUDIT = cast(Table, AdminAuditEntry.__table__)

SEVERITIES: Final = ("critical", "high", "medium", "low")
SEVERITY_RANK: Final = {name: rank for rank, name in enumerate(SEVERITIES)}
STATES: Final = ("open", "acknowledged", "resolved")
# "unresolved": open or acknowledged, what security staff work on.
STATE_CHOICES: Final = (*STATES, "unresolved")
# The labels a list can be narrowed by (the alert's subject as the rules name it).
LABEL_FILTERS: Final = ("area", "door", "person", "agent", "terminal")
DEFAULT_LIMIT: Final = 50
MAX_LIMIT: Final = 500
HISTORY_LIMIT: Final = 500
CURSOR_VERSION: Final = 1

# A stream re-reads what changed this long before the newest change it saw: a transaction that stamped its
# rows earlier and committed later (an engine round over many events) is still caught, and sent once.
# How far before the newest stamp seen a round looks again: a change is stamped when its transaction begins
# and becomes visible at commit, which a busy writer lock can delay by seconds.
MARGIN: Final = timedelta(seconds=15)
POLL_PAGE: Final = 1000
POLL_PAGES: Final = 5

# The list's first two sort columns: resolved last, then severity (SQL expressions, not constants).
group_order = case((ALERTS.c.state == "resolved", 1), else_=0)
rank_order = case(SEVERITY_RANK, value=ALERTS.c.severity, else_=len(SEVERITIES))


class ListingError(ValueError):
    """A filter value, cursor or limit that cannot be used (the text names which)."""


@dataclass(frozen=True)
class AlertFilter:
    """What a list (or a stream) is narrowed to; None everywhere is every alert.

    ``since`` / ``until`` select alerts seen in the period: last seen at or after ``since``, first seen
    before ``until``.
    """

    state: str | None = None
    severity: str | None = None
    rule: str | None = None
    labels: tuple[tuple[str, str], ...] = ()
    since: datetime | None = None
    until: datetime | None = None

    def __post_init__(self) -> None:
        if self.state is not None and self.state not in STATE_CHOICES:
            raise ListingError(f"state: one of {', '.join(STATE_CHOICES)}")
        if self.severity is not None and self.severity not in SEVERITY_RANK:
            raise ListingError(f"severity: one of {', '.join(SEVERITIES)}")
        if self.rule is not None and self.rule not in RULES:
            raise ListingError("rule: not a rule of the catalogue")
        for key, _value in self.labels:
            if key not in LABEL_FILTERS:
                raise ListingError(f"label filter: one of {', '.join(LABEL_FILTERS)}")
        for moment in (self.since, self.until):
            if moment is not None and moment.tzinfo is None:
                raise ListingError("a period needs times with their time zone")

    def where(self) -> list[ColumnElement[bool]]:
        """Return the SQL conditions of this filter."""
        a = ALERTS.c
        out: list[ColumnElement[bool]] = []
        if self.state == "unresolved":
            out.append(a.state != "resolved")
        elif self.state is not None:
            out.append(a.state == self.state)
        if self.severity is not None:
            out.append(a.severity == self.severity)
        if self.rule is not None:
            out.append(a.rule == self.rule)
        for key, value in self.labels:
            out.append(a.labels[key].as_string() == value)
        if self.since is not None:
            out.append(a.last_at >= self.since)
        if self.until is not None:
            out.append(a.first_at < self.until)
        return out

    def matches(self, row: Any) -> bool:
        """Tell whether an alert row passes this filter (the streams judge each change as the list would)."""
        if self.state == "unresolved" and row.state == "resolved":
            return False
        if self.state not in (None, "unresolved") and row.state != self.state:
            return False
        if self.severity is not None and row.severity != self.severity:
            return False
        if self.rule is not None and row.rule != self.rule:
            return False
        labels = row.labels or {}
        if any(labels.get(key) != value for key, value in self.labels):
            return False
        if self.since is not None and row.last_at < self.since:
            return False
        return not (self.until is not None and row.first_at >= self.until)


@dataclass(frozen=True)
class SortKey:
    """Where an alert sits in the list: resolved or not, severity rank, last seen, id."""

    group: int
    rank: int
    last_at: datetime
    id: int


def sort_key(row: Any) -> SortKey:
    """Return the sort key of an alert row."""
    group = 1 if row.state == "resolved" else 0
    return SortKey(group, SEVERITY_RANK.get(row.severity, len(SEVERITIES)), row.last_at, int(row.id))


def encode_cursor(key: SortKey) -> str:
    """Return the opaque cursor of the page after this key (base64url JSON: not a secret, only opaque)."""
    body = [CURSOR_VERSION, key.group, key.rank, timefmt.fmt(key.last_at), key.id]
    return base64.urlsafe_b64encode(json.dumps(body, separators=(",", ":")).encode()).decode().rstrip("=")


def decode_cursor(text: str) -> SortKey:
    """Parse a cursor made by encode_cursor; anything else raises ListingError."""
    bad = ListingError("cursor: not a cursor of this list")
    if not 0 < len(text) <= 200:
        raise bad
    try:
        body = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
    except (binascii.Error, ValueError) as err:
        raise bad from err
    if not (isinstance(body, list) and len(body) == 5 and body[0] == CURSOR_VERSION):
        raise bad
    _, group, rank, at, ident = body
    if not all(type(v) is int for v in (group, rank, ident)) or group not in (0, 1) or not 0 <= rank <= 9:
        raise bad
    try:
        return SortKey(group, rank, timefmt.parse(at, "cursor"), ident)
    except Exception as err:  # timefmt raises Rejected for a malformed time: the same bad cursor
        raise bad from err


@dataclass(frozen=True)
class AlertPage:
    """One page of alerts and the cursor of the next (None: this is the last)."""

    rows: list[Any]
    next_cursor: str | None


def page(conn: Connection, flt: AlertFilter, *, cursor: str | None = None, limit: int = DEFAULT_LIMIT) -> AlertPage:
    """Return one page of alerts in list order (unresolved first, severity, newest), after the cursor."""
    if not 1 <= limit <= MAX_LIMIT:
        raise ListingError(f"limit: 1..{MAX_LIMIT}")
    a = ALERTS.c
    where = flt.where()
    if cursor:
        k = decode_cursor(cursor)
        same_rank = and_(group_order == k.group, rank_order == k.rank)
        where.append(
            or_(
                group_order > k.group,
                and_(group_order == k.group, rank_order > k.rank),
                and_(same_rank, a.last_at < k.last_at),
                and_(same_rank, a.last_at == k.last_at, a.id < k.id),
            )
        )
    rows = list(
        conn.execute(
            select(*ALERTS.columns)
            .where(*where)
            .order_by(group_order, rank_order, a.last_at.desc(), a.id.desc())
            .limit(limit + 1)
        )
    )
    more = len(rows) > limit
    rows = rows[:limit]
    return AlertPage(rows, encode_cursor(sort_key(rows[-1])) if more and rows else None)


def get(conn: Connection, alert_id: int) -> Any | None:
    """Return one alert row, or None."""
    return conn.execute(select(*ALERTS.columns).where(ALERTS.c.id == alert_id)).first()


def events_of(conn: Connection, alert_id: int, limit: int = EVENTS_KEPT) -> list[Any]:
    """Return the stored events behind an alert (those the book kept), oldest first."""
    e, ae = _EVENTS.c, ALERT_EVENTS.c
    return list(
        conn.execute(
            select(e.id, e.event_id, e.occurred_at, e.type, e.agent_id, e.payload)
            .join(ALERT_EVENTS, ae.event_id == e.id)
            .where(ae.alert_id == alert_id)
            .order_by(e.occurred_at, e.id)
            .limit(limit)
        )
    )


def history(conn: Connection, alert_id: int, limit: int = HISTORY_LIMIT) -> list[Any]:
    """Return the admin-trail rows about an alert (opened, acknowledged, notified…), oldest first."""
    t = _AUDIT.c
    return list(
        conn.execute(
            select(t.id, t.at, t.actor, t.via, t.action, t.old, t.new, t.detail)
            .where(t.target == f"alert:{alert_id}")
            .order_by(t.id)
            .limit(limit)
        )
    )


def open_counts(conn: Connection) -> dict[str, dict[str, int]]:
    """Return the alerts not resolved, by severity and state: {"critical": {"open": n, "acknowledged": m}…}."""
    a = ALERTS.c
    out = {severity: {"open": 0, "acknowledged": 0} for severity in SEVERITIES}
    rows = conn.execute(
        select(a.severity, a.state, func.count()).where(a.state != "resolved").group_by(a.severity, a.state)
    )
    for severity, state, n in rows:
        if severity in out and state in out[severity]:
            out[severity][state] = int(n)
    return out


def alert_settings(store: Store) -> AlertSettings:
    """Return the alerts section of the policy in force (defaults before any policy is stored)."""
    row = store.current_policy_version()
    if row is None:
        return AlertSettings()
    return SitePolicy.model_validate(row.document).alerts


@dataclass
class ChangeFeed:
    """Which alerts changed since the last look: a live stream's place in the alerts table.

    Every book change bumps an alert's ``version`` and stamps ``updated_at``. A round reads the (id, version)
    of rows stamped since the newest stamp seen minus MARGIN, and returns the full rows whose version it has
    not sent yet. A round reads at most POLL_PAGES pages; when there is more, the next round carries on from
    the last row read instead of starting again, so a burst is sent in full, in order.
    """

    watermark: datetime | None = None
    resume: tuple[datetime, int] | None = None
    sent: dict[int, tuple[int, datetime]] = field(default_factory=dict)

    @classmethod
    def starting_now(cls, conn: Connection) -> ChangeFeed:
        """Start after what the table holds now: only changes made from here on are sent."""
        a = ALERTS.c
        feed = cls()
        top = conn.execute(select(func.max(a.updated_at))).scalar()
        if top is not None:
            feed.watermark = top
            recent = conn.execute(
                select(a.id, a.version, a.updated_at).where(a.updated_at >= top - MARGIN).limit(POLL_PAGE * POLL_PAGES)
            )
            feed.sent = {int(r.id): (int(r.version), r.updated_at) for r in recent}
        return feed

    @classmethod
    def starting_at(cls, since: datetime) -> ChangeFeed:
        """Start at a stamp (a page's as-of, a reconnecting browser's last event id): changes since are sent."""
        return cls(watermark=since)

    def poll(self, conn: Connection) -> list[Any]:
        """Return the full rows of the alerts changed since the last round, oldest change first."""
        a = ALERTS.c
        after = self.resume
        lower = self.watermark - MARGIN if self.watermark is not None and after is None else None
        seen: list[Any] = []
        self.resume = None
        for number in range(POLL_PAGES):
            query = select(a.id, a.version, a.updated_at)
            if after is not None:
                query = query.where(or_(a.updated_at > after[0], and_(a.updated_at == after[0], a.id > after[1])))
            elif lower is not None:
                query = query.where(a.updated_at >= lower)
            batch = list(conn.execute(query.order_by(a.updated_at, a.id).limit(POLL_PAGE)))
            seen += batch
            if len(batch) < POLL_PAGE:
                break
            after = (batch[-1].updated_at, int(batch[-1].id))
            if number == POLL_PAGES - 1:
                self.resume = after
        if not seen:
            return []
        newest = seen[-1].updated_at
        self.watermark = newest if self.watermark is None else max(self.watermark, newest)
        changed = [int(r.id) for r in seen if self.sent.get(int(r.id), (0, newest))[0] < int(r.version)]
        rows: list[Any] = []
        for start in range(0, len(changed), 500):
            chunk = changed[start : start + 500]
            rows += conn.execute(select(*ALERTS.columns).where(a.id.in_(chunk))).all()
        rows.sort(key=lambda r: (r.updated_at, r.id))
        for row in rows:
            self.sent[int(row.id)] = (int(row.version), row.updated_at)
        horizon = self.watermark - MARGIN
        self.sent = {k: v for k, v in self.sent.items() if v[1] >= horizon}
        return rows


CONFLICTS: Final = frozenset(
    {"not_open", "already_resolved", "not_resolved", "needs_override", "newer_live", "silence_not_active", "not_dead"}
)


def refusal(err: AlertRefused) -> tuple[str, str | None]:
    """Return what a refusal is about ("required", "not_open"…, "other") and the field it names, if any."""
    return err.kind, err.field


def refusal_status(err: AlertRefused) -> int:
    """Return the HTTP status of a refusal: 404 no such alert, 409 the alert's state forbids it, else 422."""
    kind, _ = refusal(err)
    if kind == "not_found":
        return 404
    return 409 if kind in CONFLICTS else 422


def labels_of(row: Any) -> dict[str, str]:
    """Return an alert's labels as text."""
    return {str(k): str(v) for k, v in dict(row.labels or {}).items()}
