"""`sekisho bench registers` on a small synthetic site: it runs end to end and its figures are sane.

No wall-clock assertions: the test checks that the bench measures (keys present, positive numbers, CSV rows
as asked), that the projection the bench writes in bulk is exactly what DoorProjector.rebuild() gives, and
that the chains it writes verify.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from sekisho.bench import registers_data as data
from sekisho.bench.cli import bench_app
from sekisho.controller.reports.service import Reports
from sekisho.controller.store import Store, make_engine, upgrade
from sekisho.lab.pgcluster import find_pg_bin, pg_database, postgres_cluster
from sekisho.protocol import signing

END = datetime(2026, 11, 19, 9, 0, tzinfo=UTC)


def _loaded(url: str, events: int, workers: int = 0) -> Store:
    engine = make_engine(url)
    upgrade(engine)
    store = Store(engine, signing_key=signing.generate_key())
    shape = data.site_shape(people=40, visitors=4)
    keys = data.prepare_store(store, shape, signing.generate_key())
    data.ensure_streams(store, shape.agents)
    source = data.EventSource(shape, keys, end=END, days=14, total=events)
    if workers:
        loaded = data.load_events_parallel(store, source, workers=workers, batch=700)
    else:
        loaded = data.load_events(store, iter(source), batch=700)
    assert events * 0.99 <= loaded.events <= events  # follow-ups due after the end are not emitted
    data.project(store, batch=900)
    return store


def _check_store(store: Store) -> None:
    matches, counts = data.projection_matches(store)
    assert matches, "the bulk projection differs from DoorProjector.rebuild()"
    assert counts["door_log"] > 0 and counts["key_loans"] > 0 and counts["area_presence"] > 0 and counts["visits"] > 0
    status = Reports(store, clock=lambda: END).chains.check(data.site_shape(people=40, visitors=4).agents, full=True)
    assert status.state == "verified", status.problems


def test_bulk_projection_and_chains_sqlite(tmp_path: Path) -> None:
    store = _loaded(f"sqlite:///{tmp_path / 'r.sqlite3'}", 6000)
    try:
        _check_store(store)
    finally:
        store.engine.dispose()


@pytest.mark.skipif(find_pg_bin() is None, reason="PostgreSQL is not installed")
def test_bulk_projection_and_chains_postgres() -> None:
    with postgres_cluster() as cluster, pg_database(cluster) as url:
        store = _loaded(url, 4000, workers=2)
        try:
            _check_store(store)
        finally:
            store.engine.dispose()


def test_parallel_load_stores_what_the_serial_generator_makes(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'p.sqlite3'}")
    upgrade(engine)
    store = Store(engine, signing_key=signing.generate_key())
    try:
        shape = data.site_shape(people=20, visitors=2)
        keys = data.prepare_store(store, shape, signing.generate_key())
        data.ensure_streams(store, shape.agents)
        loaded = data.load_events_parallel(
            store, data.EventSource(shape, keys, end=END, days=7, total=3000), workers=2, batch=500
        )
        # The same generator signed and chained in this process, one event after the other.
        chains = data.Chains()
        serial = [
            chains.row(g, pk) for pk, g in enumerate(data.EventSource(shape, keys, end=END, days=7, total=3000), 1)
        ]
        with engine.connect() as conn:
            stored = conn.execute(
                select(data.EVENTS.c.id, data.EVENTS.c.raw, data.EVENTS.c.hash, data.EVENTS.c.person).order_by(
                    data.EVENTS.c.id
                )
            ).all()
        assert loaded.events == len(serial) == len(stored)
        assert [tuple(r) for r in stored] == [(r["id"], r["raw"], r["hash"], r["person"]) for r in serial]
        status = Reports(store, clock=lambda: END).chains.check(shape.agents, full=True)
        assert status.state == "verified", status.problems
    finally:
        engine.dispose()


def test_bench_registers_json(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        bench_app,
        [
            "registers",
            "--events",
            "20000",
            "--backend",
            "sqlite",
            "--rounds",
            "3",
            "--csv-rows",
            "2000",
            "--deep-pages",
            "3",
            "--workdir",
            str(tmp_path / "w"),
        ],
    )
    assert result.exit_code == 0, result.output
    figures = json.loads(result.output.strip().splitlines()[-1])
    for key in ("rows", "query_p95_ms", "timeline_p95_ms", "page_p95_ms", "csv_peak_rss_mb"):
        assert isinstance(figures[key], int | float) and figures[key] > 0, key
    assert 19_800 <= figures["rows"] <= 20_000
    assert figures["csv_rows"] == 2000
    sqlite = figures["backends"]["sqlite"]
    assert sqlite["bare_sql_p95_ms"] > 0 and sqlite["csv_rss_ratio"] > 0
    assert sqlite["http_failures"] == []  # every reading's HTML and JSON page answered 200


@pytest.mark.parametrize(
    "backend",
    [
        "sqlite",
        pytest.param("postgres", marks=pytest.mark.skipif(find_pg_bin() is None, reason="PostgreSQL is not installed")),
    ],
)
def test_bench_registers_keep_measures_the_kept_database_again(request: pytest.FixtureRequest, backend: str) -> None:
    """--keep: the second run loads nothing, measures the same rows, and its chains still verify with the kept key."""
    args = ["registers", "--events", "6000", "--backend", backend, "--rounds", "3", "--csv-rows", "500"]
    # Not under tmp_path: as root the kept cluster runs as postgres, which cannot pass pytest's 0700 folders.
    work = Path(tempfile.mkdtemp(prefix="sekisho-keep-"))
    request.addfinalizer(lambda: shutil.rmtree(work, ignore_errors=True))
    args += ["--deep-pages", "2", "--workdir", str(work), "--keep"]
    first = CliRunner().invoke(bench_app, args)
    assert first.exit_code == 0, first.output
    assert "reusing" not in first.output
    second = CliRunner().invoke(bench_app, args)
    assert second.exit_code == 0, second.output
    assert "reusing the" in second.output and "stored in" not in second.output
    a, b = (json.loads(r.output.strip().splitlines()[-1]) for r in (first, second))
    assert a["rows"] == b["rows"] and 5_900 <= b["rows"] <= 6_000
    assert b["backends"][backend]["http_failures"] == []
    # A different size asks for a fresh workdir instead of measuring the wrong database.
    other = CliRunner().invoke(bench_app, [*args[:2], "7000", *args[3:]])
    assert other.exit_code != 0


def test_bench_registers_keep_needs_workdir() -> None:
    result = CliRunner().invoke(bench_app, ["registers", "--events", "6000", "--keep"])
    assert result.exit_code == 2 and "--workdir" in result.output
