"""The SQLite bulk insert of new event rows (issue 14) writes exactly what SQLAlchemy's own insert wrote:
the same stored text for datetimes, JSON and booleans, so chains verify and readers see the same values."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast
from zoneinfo import ZoneInfo

from sqlalchemy import Table, insert

from sekisho.controller.store import Store, make_engine, upgrade
from sekisho.controller.store.events import EVENT_COLUMNS, EventRecords
from sekisho.controller.store.models import Event
from sekisho.protocol import signing

_EVENTS = cast(Table, Event.__table__)


def _rows() -> list[dict[str, Any]]:
    at = datetime(2026, 12, 7, 9, 30, 1, 123456, tzinfo=UTC)
    jst = at.astimezone(ZoneInfo("Asia/Tokyo"))
    return [
        {
            "agent_id": "term-s1",
            "seq": seq,
            "event_id": f"{seq:032x}",
            "type": "test.synthetic",
            "occurred_at": jst if seq % 2 else at,  # any aware time is stored as UTC
            "received_at": at + timedelta(seconds=1),
            "stored_at": at + timedelta(seconds=2),
            "clock_synced": bool(seq % 2),
            "clock_offset_ms": None if seq % 2 else -1500,
            "payload": {"n": seq, "note": "改札 é", "nested": {"list": [1, "two", None, True]}},
            "raw": '{"event":{}}',
            "chain_index": seq,
            "prev_hash": "0" * 64,
            "hash": f"{seq:064x}",
            "person": "p-1" if seq == 2 else None,
            "account": None,
        }
        for seq in (1, 2, 3)
    ]


def _stored(url: str) -> list[tuple[Any, ...]]:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            columns = ", ".join(EVENT_COLUMNS)
            return list(conn.exec_driver_sql(f"SELECT {columns} FROM events ORDER BY seq").all())
    finally:
        engine.dispose()


def test_sqlite_bulk_insert_stores_what_sqlalchemy_stored(tmp_path: Path) -> None:
    urls = {name: f"sqlite:///{tmp_path / name / 'controller.db'}" for name in ("fast", "generic")}
    key = signing.generate_key()
    for url in urls.values():
        upgrade(url)
        engine = make_engine(url)
        try:
            Store(engine, signing_key=key).register_agent("term-s1", signing.public_key_pem(key.public_key()).decode())
        finally:
            engine.dispose()
    for name, url in urls.items():
        engine = make_engine(url)
        try:
            with engine.begin() as conn:
                if name == "fast":
                    EventRecords._insert_events(conn, _rows())
                else:
                    conn.execute(insert(_EVENTS), _rows())
        finally:
            engine.dispose()
    fast, generic = _stored(urls["fast"]), _stored(urls["generic"])
    assert len(fast) == 3
    assert fast == generic
