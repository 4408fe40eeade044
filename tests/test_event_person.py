"""events.person and events.account (migration 0011): filled at ingest, backfilled, and what the person queries use.

The USB log by person and a person's timeline used to filter on the JSON payload, which reads every USB
(login) event of every person; these tests hold the plan to the indexed columns on SQLite and PostgreSQL.
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import pytest
from alembic import command
from reports_fixtures import T0, Site
from sqlalchemy import Connection, event, select, text, update

from sekisho.controller.reports.filters import Filter
from sekisho.controller.reports.paging import SortKey
from sekisho.controller.reports.queries import Context, after
from sekisho.controller.reports.registers import REGISTERS
from sekisho.controller.reports.timelines import Subject, sources
from sekisho.controller.store import Store
from sekisho.controller.store.chain import subject_columns
from sekisho.controller.store.db import alembic_config
from sekisho.controller.store.models import Event

if TYPE_CHECKING:
    from store_fixtures import MakeAgent


@pytest.fixture
def site(store: Store, make_agent: MakeAgent) -> Site:
    return Site(store, make_agent)


def _columns(store: Store) -> dict[str, tuple[str | None, str | None]]:
    with store.engine.connect() as conn:
        rows = conn.execute(select(Event.type, Event.person, Event.account).order_by(Event.id)).all()
    return {f"{i}:{r.type}": (r.person, r.account) for i, r in enumerate(rows)}


def _activity(site: Site) -> None:
    site.usb("usb.blocked", T0, person="p-0001")
    site.usb("usb.inserted", T0 + timedelta(minutes=1))  # nobody logged in: no person
    site.login("p-0001", "mihon.taro", T0 + timedelta(minutes=2))
    site.send("session.locked", {"terminal": "t-hr-01", "user": "mihon.taro", "cause": "card_removed"}, T0, site.term)
    site.pass_door("p-0001", "entry", T0 + timedelta(minutes=3))


EXPECTED = {
    "0:usb.blocked": ("p-0001", None),
    "1:usb.inserted": (None, None),
    "2:login.granted": ("p-0001", "mihon.taro"),
    "3:session.locked": (None, "mihon.taro"),
    "4:door.access_granted": ("p-0001", None),
}


def test_ingest_fills_person_and_account_from_the_signed_payload(site: Site) -> None:
    _activity(site)
    assert _columns(site.store) == EXPECTED
    # Odd values are not copied: the column holds an id or nothing.
    assert subject_columns({"person": "", "user": 7}) == {"person": None, "account": None}
    assert subject_columns(["not", "a", "dict"]) == {"person": None, "account": None}


def test_migration_0011_backfills_existing_rows_in_batches(site: Site, db_url: str) -> None:
    _activity(site)
    engine = site.store.engine
    with engine.begin() as conn:
        conn.execute(update(Event).values(person=None, account=None))
        # 0016 refuses to go down while the checkpoint log seals the record log (verify would break), and the
        # site's first write sealed it. This test is about 0011's backfill: take the seal out, as on a
        # database from before 0016, so the downgrade can pass through.
        conn.execute(text("DELETE FROM checkpoints WHERE kind IN ('records', 'records_seal')"))
    # Down to 0010 (drops the columns) and up again: the migration fills them from the payloads.
    config = alembic_config()
    for step in ("0010", "head"):
        with engine.begin() as conn:
            config.attributes["connection"] = conn
            (command.downgrade if step == "0010" else command.upgrade)(config, step)
    assert _columns(site.store) == EXPECTED


def _plan(conn: Connection, stmt: Any) -> str:
    """Return the database's plan of stmt as one string (SQLite EXPLAIN QUERY PLAN, PostgreSQL EXPLAIN)."""
    sqlite = conn.dialect.name == "sqlite"
    if not sqlite:
        # A test database is tiny: a sequential scan would win on cost alone. With it ruled out the planner
        # still picks among the indexes, so this shows which index the query can be served by.
        conn.execute(text("SET LOCAL enable_seqscan = off"))
    prefix = "EXPLAIN QUERY PLAN " if sqlite else "EXPLAIN "

    # The statement exactly as the register runs it (its expanded IN lists and binds), asked to be explained.
    def explain(conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool) -> tuple[str, Any]:
        return prefix + statement, params

    event.listen(conn, "before_cursor_execute", explain, retval=True)
    try:
        rows = conn.execute(stmt).all()
    finally:
        event.remove(conn, "before_cursor_execute", explain)
    return "\n".join(str(r[-1] if sqlite else r[0]) for r in rows)


def test_person_queries_read_the_person_index_not_every_usb_event(site: Site) -> None:
    _activity(site)
    reports = site.reports
    month = Filter(person="p-0001", since=T0 - timedelta(days=30), until=T0 + timedelta(days=1))
    ctx = Context(reports.directory(), month, T0)
    (usb,) = REGISTERS["usb"].segments(ctx)
    (logins,) = REGISTERS["logins"].segments(ctx)
    timeline = [s for s in sources(ctx, Subject("person", "p-0001"), admin=False) if s.rank in (3, 4)]
    assert len(timeline) == 2  # the login and USB sources
    with site.store.engine.begin() as conn:
        for segment in (usb, logins, *timeline):
            plan = _plan(conn, after(segment, None, 51))
            assert "ix_events_person_occurred_at" in plan, plan
            if segment.branches:
                # Login history: the person's events and their account's, each read in order through its index
                # and merged; an OR of the two made PostgreSQL read and sort every login of the person.
                assert "ix_events_account_occurred_at" in plan, plan
                # Each branch stops at the page's size on its own (a Limit per branch, then the merge's).
                if conn.dialect.name == "postgresql":
                    assert plan.count("Limit") == 3 and "Bitmap" not in plan, plan
            if conn.dialect.name == "sqlite":
                assert "SCAN events" not in plan and "ix_events_type_occurred_at" not in plan, plan
            else:
                assert "Seq Scan on events" not in plan and "ix_events_type_occurred_at" not in plan, plan
    assert logins.branches and timeline[0].branches  # the login sources are the ones with an account
    # And the answers are still the person's own rows.
    assert [r.values["type"] for r in reports.page("usb", month).rows] == ["usb.blocked"]
    p1 = reports.timeline(Subject("person", "p-0001"), month.narrowed(person=None)).rows
    assert sorted(r.kind for r in p1) == ["login", "login", "usb"]  # login.granted by person, session.locked by account
    # Each once, newest first, though login.granted names both the person and the account.
    history = [r.values["type"] for r in reports.page("logins", month).rows]
    assert history == ["login.granted", "session.locked"]


def test_a_later_page_seeks_to_its_cursor_in_the_index(site: Site) -> None:
    # Keyset paging: the page after a cursor must start reading the index at the cursor, not read the
    # filter's whole range from its newest row and drop what comes before (page 21 of a month at 10M events).
    _activity(site)
    reports = site.reports
    ctx = Context(reports.directory(), Filter(person="p-0001"), T0)
    (rooms,) = REGISTERS["rooms"].segments(ctx)
    key = SortKey(rooms.number, T0, 0, 10**9)
    with site.store.engine.begin() as conn:
        plan = _plan(conn, after(rooms, key).limit(51))
        if conn.dialect.name == "sqlite":
            # Which index SQLite picks depends on the data; either way the time column bounds the search.
            assert re.search(r"SEARCH door_log USING INDEX ix_door_log_\w+ \(\w+=\? AND occurred_at<\?\)", plan), plan
        # The same rows as reading from the start and skipping to the cursor.
        everything = conn.execute(after(rooms, None)).mappings().all()
        resumed = conn.execute(after(rooms, key)).mappings().all()
    expected = [r for r in everything if (r["occurred_at"], r["id"]) < (T0, 10**9)]
    assert [r["id"] for r in resumed] == [r["id"] for r in expected]


# --- login history by terminal on PostgreSQL (migration 0015) ---------------------------------------------------

FILLER_AGENTS = 40
FILLER_EVENTS = 200_000


def _crowd(conn: Connection, terminal_agent: str) -> None:
    """Fill events as a site's do: many agents, the terminal's agent one of them, logins a share of each."""
    conn.execute(
        text(
            "INSERT INTO agents (id, public_key_pem, status, registered_at) "
            "SELECT 'filler-' || g, 'none', 'active', now() FROM generate_series(1, :n) g"
        ),
        {"n": FILLER_AGENTS},
    )
    # Every (FILLER_AGENTS + 1)-th row is the terminal's agent; a third of all rows are logins naming their terminal.
    conn.execute(
        text(
            "INSERT INTO events (agent_id, seq, event_id, type, occurred_at, received_at, stored_at, clock_synced, "
            "payload, raw, chain_index, prev_hash, hash) "
            "SELECT CASE WHEN g % :k = 0 THEN :term ELSE 'filler-' || (g % :k) END, 1000 + g, 'filler' || g, "
            "CASE WHEN g % 3 = 0 THEN 'login.granted' ELSE 'door.access_granted' END, "
            ":t0 - g * interval '10 seconds', :t0, :t0, true, "
            "CASE WHEN g % 3 = 0 THEN json_build_object('terminal', "
            "  CASE WHEN g % :k = 0 THEN 't-hr-01' ELSE 't-filler-' || (g % :k) END) "
            "ELSE json_build_object('door', 'd-' || (g % :k)) END, '', 1000 + g, '', '' "
            "FROM generate_series(1, :n) g"
        ),
        {"k": FILLER_AGENTS + 1, "term": terminal_agent, "t0": T0, "n": FILLER_EVENTS},
    )
    conn.execute(text("ANALYZE events"))


def test_login_history_by_terminal_walks_the_agents_index_on_postgresql(site: Site) -> None:
    # Without statistics tying the agent to the terminal in its payload, PostgreSQL expected a handful of rows,
    # read every login of the agent through a bitmap and sorted them (2.9 s at 8.6M events); with them it walks
    # the agent's index backwards and stops after one page.
    if site.store.engine.dialect.name != "postgresql":
        pytest.skip("the planner's estimate is PostgreSQL's; SQLite's plan is held by the test above")
    site.login("p-0001", "mihon.taro", T0)
    reports = site.reports
    ctx = Context(reports.directory(), Filter(terminal="t-hr-01"), T0 + timedelta(days=1))
    (logins,) = REGISTERS["logins"].segments(ctx)
    query = after(logins, None, 51)

    def plan() -> str:
        with site.store.engine.begin() as conn:
            return "\n".join(r[0] for r in conn.execute(text("EXPLAIN " + _literal(conn, query))))

    with site.store.engine.begin() as conn:
        _crowd(conn, site.term.agent_id)
    walked = plan()
    assert "Index Scan Backward using ix_events_agent_id_occurred_at" in walked, walked
    assert "Bitmap" not in walked and "Seq Scan" not in walked, walked
    # The same data without the statistics: the plan the migration exists to avoid.
    with site.store.engine.begin() as conn:
        conn.execute(text("DROP STATISTICS st_events_agent_terminal"))
        conn.execute(text("ANALYZE events"))
    assert "Index Scan Backward using ix_events_agent_id_occurred_at" not in plan()
    # And the page is the terminal's own logins, newest first.
    rows = reports.page("logins", Filter(terminal="t-hr-01")).rows
    assert rows and all(r.values["type"] == "login.granted" for r in rows)


def _literal(conn: Connection, stmt: Any) -> str:
    """Return the statement's SQL with its values inlined (EXPLAIN takes no bind parameters here)."""
    return str(stmt.compile(dialect=conn.dialect, compile_kwargs={"literal_binds": True}))
