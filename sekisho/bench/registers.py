"""`sekisho bench registers`: register and timeline queries, page responses and CSV memory over millions of events.

For each backend (SQLite, a private PostgreSQL cluster) the bench loads synthetic signed events with real
hash chains and projects them into the door registers (registers_data.py), then measures:

- the common register queries and the person timeline through ``Reports`` (names resolved, the chains
  behind the rows verified), first page and a deep page, p50/p95 over ``rounds`` repetitions each, against
  the same segments' bare SQL (no names, no verification) in the same run;
- the verification's cold walk (the first page after a process starts, or every ``full_every``);
- full page responses over HTTP (the console's HTML page and the JSON API, uvicorn on loopback, a per-user
  API token of a facility manager);
- the peak RSS (VmHWM) of CSV exports of N/10 and N rows, each in a fresh subprocess.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from sqlalchemy import func, select

from sekisho.bench import registers_data as data
from sekisho.common.files import write_atomically
from sekisho.controller.console.register_query import PAGES_BY_NAME
from sekisho.controller.reports.filters import Filter
from sekisho.controller.reports.queries import Context, after
from sekisho.controller.reports.registers import DOOR_LOG, REGISTERS
from sekisho.controller.reports.service import Reports
from sekisho.controller.reports.timelines import Subject, _after_for, sources
from sekisho.controller.reports.verify import ChainCheck
from sekisho.controller.store import Store, make_engine, upgrade
from sekisho.lab.pgcluster import pg_database, postgres_cluster
from sekisho.protocol import signing

QUERY_GOAL_MS = 100.0
PAGE_GOAL_MS = 200.0
LIMIT = 50


@dataclass(frozen=True)
class Options:
    """What to run: events, backends, repetitions, CSV rows, deep-page depth, HTTP on or off."""

    events: int = 10_000_000
    backends: tuple[str, ...] = ("sqlite", "postgres")
    rounds: int = 50
    csv_rows: int = 100_000
    deep_pages: int = 20
    days: int = 90
    http: bool = True
    workdir: Path | None = None
    keep: bool = False  # keep the loaded databases in workdir and measure them again on the next run


@dataclass(frozen=True)
class Query:
    """One measured reading: a register page or a person timeline, with its filter."""

    name: str
    register: str | None
    subject: Subject | None
    filter: Callable[[datetime], Filter]
    api_path: str
    page_path: str
    params: dict[str, str]


def _p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def queries(shape: data.SiteShape) -> list[Query]:
    """Return the readings a facility manager runs most (see the module docstring)."""
    person, room, terminal = shape.staff[7], shape.rooms[0], shape.terminals[0]
    ps = Subject("person", person)
    return [
        Query(
            "keys overdue first",
            "keys",
            None,
            lambda now: Filter(),
            "/api/v1/registers/keys",
            PAGES_BY_NAME["keys"].path,
            {},
        ),
        Query(
            "room log: door + this week",
            "rooms",
            None,
            lambda now: Filter.for_period("this_week", now, door=room),
            "/api/v1/registers/rooms",
            PAGES_BY_NAME["rooms"].path,
            {"door": room, "preset": "this_week"},
        ),
        Query(
            "room log: person + this month",
            "rooms",
            None,
            lambda now: Filter.for_period("this_month", now, person=person),
            "/api/v1/registers/rooms",
            PAGES_BY_NAME["rooms"].path,
            {"person": person, "preset": "this_month"},
        ),
        Query(
            "login history: terminal",
            "logins",
            None,
            lambda now: Filter(terminal=terminal),
            "/api/v1/registers/logins",
            PAGES_BY_NAME["logins"].path,
            {"terminal": terminal},
        ),
        Query(
            "login history: person",
            "logins",
            None,
            lambda now: Filter(person=person),
            "/api/v1/registers/logins",
            PAGES_BY_NAME["logins"].path,
            {"person": person},
        ),
        Query(
            "USB log: person",
            "usb",
            None,
            lambda now: Filter(person=person),
            "/api/v1/registers/usb",
            PAGES_BY_NAME["usb"].path,
            {"person": person},
        ),
        Query(
            "timeline: person, today",
            None,
            ps,
            lambda now: Filter.for_period("today", now),
            f"/api/v1/timelines/person/{person}",
            f"/console/timeline/person/{person}",
            {"preset": "today"},
        ),
        Query(
            "timeline: person, this month",
            None,
            ps,
            lambda now: Filter.for_period("this_month", now),
            f"/api/v1/timelines/person/{person}",
            f"/console/timeline/person/{person}",
            {"preset": "this_month"},
        ),
    ]


# --- one backend -------------------------------------------------------------------------------------------


@dataclass
class Timing:
    """p50/p95 in ms of one reading at one depth, and its bare-SQL baseline."""

    query: str
    depth: str
    rows: int
    p50: float
    p95: float
    base_p50: float
    base_p95: float


def _read(reports: Reports, q: Query, flt: Filter, cursor: str | None) -> Any:
    if q.register is not None:
        return reports.page(q.register, flt, cursor=cursor, limit=LIMIT)
    assert q.subject is not None
    return reports.timeline(q.subject, flt, cursor=cursor, limit=LIMIT)


def _bare(reports: Reports, q: Query, flt: Filter, cursor: str | None, as_of: datetime) -> int:
    """Run the same segments' SQL with no names, no rows built, no verification; return the rows read."""
    from sekisho.controller.reports.paging import decode_cursor

    key = decode_cursor(cursor).after if cursor else None
    ctx = Context(reports.directory(), flt, as_of)
    got = 0
    with reports.store.engine.connect() as conn:
        if q.register is not None:
            for segment in REGISTERS[q.register].segments(ctx):
                if key is not None and segment.number < key.segment:
                    continue
                got += len(conn.execute(after(segment, key, LIMIT + 1 - got)).all())
                if got > LIMIT:
                    break
        else:
            assert q.subject is not None
            for segment in sources(ctx, q.subject, admin=reports.has_admin_trail()):
                got += len(conn.execute(_after_for(segment, key, LIMIT + 1)).all())
    return got


def time_queries(reports: Reports, shape: data.SiteShape, now: datetime, rounds: int, deep: int) -> list[Timing]:
    """Time every reading's first page and its page after `deep` pages, with its baseline."""
    out: list[Timing] = []
    for q in queries(shape):
        flt = q.filter(now)
        cursor: str | None = None
        for _ in range(deep):
            page = _read(reports, q, flt, cursor)
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
        for depth, at in (("first", None), (f"after {deep} pages" if cursor else "last", cursor)):
            spent, base = [], []
            rows = 0
            for _ in range(rounds):
                t0 = time.perf_counter()
                page = _read(reports, q, flt, at)
                spent.append((time.perf_counter() - t0) * 1000)
                rows = len(page.rows)
                t0 = time.perf_counter()
                _bare(reports, q, flt, at, page.as_of)
                base.append((time.perf_counter() - t0) * 1000)
            out.append(Timing(q.name, depth, rows, _p(spent, 0.5), _p(spent, 0.95), _p(base, 0.5), _p(base, 0.95)))
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _serving(store: Store, root: Path, now: datetime) -> Iterator[tuple[str, str]]:
    """Serve the controller's HTTP app (API and console) on loopback; yield (base URL, a facility manager token)."""
    import uvicorn

    from sekisho.controller.accounts.roles import Role
    from sekisho.controller.api.app import create_app
    from sekisho.controller.api.deps import AppState
    from sekisho.controller.config import ControllerConfig

    config = ControllerConfig(
        profile="production",
        var_dir=root / "var",
        ca_cert=root / "ca.pem",
        tls_cert=root / "c.pem",
        tls_key=root / "c.key",
        signing_key=root / "signing.key",
    )
    state = AppState(config, store, None, signing_key=store.signing_key, clock=lambda: now)
    login = f"bench.fm.{os.urandom(3).hex()}"  # a kept database already holds the earlier runs' users
    state.accounts.create_user(
        login=login,
        display_name="試験 管理者",
        kana="しけん かんりしゃ",
        role=Role("facility_manager"),
        password="bench-registers-" + os.urandom(8).hex(),
        created_by="bench",
    )
    token = state.accounts.create_token(login, "bench", None, by="bench").token
    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(state), host="127.0.0.1", port=port, log_level="critical", access_log=False)
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", token
    finally:
        server.should_exit = True
        thread.join(timeout=15)


def time_pages(store: Store, shape: data.SiteShape, root: Path, now: datetime, rounds: int) -> dict[str, Any]:
    """Time full HTTP responses of every reading's first page: the console's HTML page and the JSON API."""
    import http.client
    from urllib.parse import urlencode

    found: dict[str, Any] = {"html": [], "json": [], "routes": [], "failures": []}
    with _serving(store, root, now) as (base, token):
        conn = http.client.HTTPConnection(base.removeprefix("http://"), timeout=120)  # one kept-alive connection
        headers = {"Authorization": f"Bearer {token}"}

        def get(path: str) -> tuple[int, int]:
            nonlocal conn
            for _ in range(2):
                try:
                    conn.request("GET", path, headers=headers)
                    answer = conn.getresponse()
                    return answer.status, len(answer.read())
                except (ConnectionError, http.client.HTTPException):
                    # The server closed the connection (after a failed page): reconnect once and ask again.
                    conn.close()
                    conn = http.client.HTTPConnection(base.removeprefix("http://"), timeout=120)
            return 599, 0

        try:
            for q in queries(shape):
                for kind, path in (("html", q.page_path), ("json", q.api_path)):
                    url = f"{path}?{urlencode(q.params)}" if q.params else path
                    code, _ = get(url)  # the first: the names and the chains' walk are warm after it
                    if code != 200:
                        found["failures"].append(f"{path}: {code}")
                        continue
                    found["routes"].append(path)
                    for _ in range(rounds):
                        t0 = time.perf_counter()
                        code, _ = get(url)
                        found[kind].append((time.perf_counter() - t0) * 1000)
                        if code != 200:
                            raise RuntimeError(f"{url} answered {code}")
        finally:
            conn.close()
    return found


_CSV_CHILD = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from datetime import datetime
    from sekisho.controller.reports.exports import export_csv
    from sekisho.controller.reports.filters import Filter
    from sekisho.controller.reports.service import Reports
    from sekisho.controller.store import Store, make_engine
    from sekisho.protocol import signing

    url, since, now = sys.argv[1], datetime.fromisoformat(sys.argv[2]), datetime.fromisoformat(sys.argv[3])
    # The controller's key, as the API process has it: the export starts from the signed verified points.
    key = signing.load_private_key(Path(sys.argv[4]))
    reports = Reports(Store(make_engine(url), signing_key=key), clock=lambda: now)
    def status(name):
        # VmHWM: this process's peak RSS (ru_maxrss would carry the parent's peak across exec).
        for line in open("/proc/self/status"):
            if line.startswith(name + ":"):
                return int(line.split()[1])
    # Warm up (imports, the names, a one-row export) so that only the export itself differs between sizes.
    for _ in export_csv(reports.reading("rooms", Filter(since=now - (now - since) / 10**6)), exporter="b",
                        exported_at=now):
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark: the peak from here on is the export's
    size = rows = 0
    reading = reports.reading("rooms", Filter(since=since))
    for chunk in export_csv(reading, exporter="bench", exported_at=now):
        size += len(chunk)
    print(json.dumps({"rows": reading.count, "bytes": size, "peak_kb": status("VmHWM")}))
    """
)


def csv_peak(url: str, rows: int, now: datetime, key_path: Path) -> dict[str, Any]:
    """Export about `rows` rows of the room log to CSV in a fresh subprocess; return its rows and peak RSS.

    The subprocess opens the store with the controller's signing key (key_path), as the controller's API does:
    without it the export could not trust the signed verified points and would walk every chain from the start.
    """
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            g = DOOR_LOG.c
            since = conn.execute(
                select(g.occurred_at)
                .where(g.door_kind == "room")
                .order_by(g.occurred_at.desc())
                .offset(max(rows - 1, 0))
                .limit(1)
            ).scalar()
            if since is None:
                since = conn.execute(select(func.min(g.occurred_at)).where(g.door_kind == "room")).scalar_one()
    finally:
        engine.dispose()
    done = subprocess.run(
        [sys.executable, "-c", _CSV_CHILD, url, since.isoformat(), now.isoformat(), str(key_path)],
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"CSV export failed: {done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


@dataclass
class BackendResult:
    """Everything measured on one backend."""

    backend: str
    events: int
    load: dict[str, float]
    projected: int
    register_rows: dict[str, int]
    cold_walk_s: float
    timings: list[Timing]
    pages: dict[str, Any]
    csv: list[dict[str, Any]]


def _counts(store: Store) -> dict[str, int]:
    with store.engine.connect() as conn:
        return {
            t.name: int(conn.execute(select(func.count()).select_from(t)).scalar_one())
            for t in (*data.REGISTER_TABLES, data.EVENTS)
        }


def _load_fresh(
    backend: str, store: Store, opts: Options, now: datetime, console: Console
) -> tuple[dict[str, float], int, float]:
    """Generate, sign, store and project opts.events events, then walk every chain once (the background job)."""
    engine = store.engine
    shape = data.site_shape()
    t0 = time.perf_counter()
    keys = data.prepare_store(store, shape, store.signing_key)  # type: ignore[arg-type]
    data.ensure_streams(store, shape.agents)
    with console.status(f"{backend}: generating, signing and storing {opts.events:,} events") as status:
        source = data.EventSource(shape, keys, end=now, days=opts.days, total=opts.events)
        # Signing in two worker processes (each agent's chain in one of them), generating and writing here.
        loaded = data.load_events_parallel(
            store, source, workers=2, progress=lambda n: status.update(f"{backend}: stored {n:,} / {opts.events:,}")
        )
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    with console.status(f"{backend}: projecting") as status:
        projected = data.project(store, progress=lambda n: status.update(f"{backend}: projected {n:,}"))
    project_s = time.perf_counter() - t0
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            conn.exec_driver_sql("ANALYZE")
            conn.commit()
    console.print(
        f"{backend}: {loaded.events:,} events stored in {load_s:.0f} s "
        f"(generate+sign {loaded.generate_s:.0f} s, write {loaded.write_s:.0f} s); "
        f"{projected:,} projected in {project_s:.0f} s"
    )
    # The walk of every chain from the start is the controller's background job now (verified points);
    # timed apart, then a fresh worker's first check, which starts from the signed points.
    t0 = time.perf_counter()
    with console.status(f"{backend}: the background walk from the start (every chain, signatures)"):
        walked = ChainCheck(store, clock=lambda: now).refresh_points("bench")
    cold = time.perf_counter() - t0
    if any(walked.values()):
        raise RuntimeError(f"chains do not verify: {[p for p in walked.values() if p][:3]}")
    load = {"load_s": load_s, "generate_s": loaded.generate_s, "write_s": loaded.write_s, "project_s": project_s}
    return load, projected, cold


def run_backend(backend: str, url: str, opts: Options, root: Path, console: Console) -> BackendResult:
    """Load, project and measure one database; with opts.keep, reuse what an earlier run loaded there."""
    marker = root / f"{backend}.loaded.json"
    key_path = root / f"{backend}-controller-signing.key"
    kept = json.loads(marker.read_text()) if opts.keep and marker.exists() else None
    if kept is not None and kept.get("events_asked") != opts.events:
        raise RuntimeError(f"{marker} holds {kept.get('events_asked')} events, not {opts.events}: remove the workdir")
    engine = make_engine(url)
    try:
        upgrade(engine)
        if kept is None:
            now = datetime.now(UTC).replace(second=0, microsecond=0)
            store = Store(engine, signing_key=signing.generate_key())
            # Written before the load: the verified points the walk signs are checked with this key later.
            write_atomically(key_path, signing.private_key_pem(store.signing_key))  # type: ignore[arg-type]
            load, projected, cold = _load_fresh(backend, store, opts, now, console)
            if opts.keep:
                kept = {"events_asked": opts.events, "now": now.isoformat(), "load": load}
                kept |= {"projected": projected, "cold_walk_s": cold}
                write_atomically(marker, json.dumps(kept).encode())
        else:
            # The loaded events end at the first run's "now"; every reading's filter is relative to it.
            now = datetime.fromisoformat(kept["now"])
            store = Store(engine, signing_key=signing.load_private_key(key_path))
            load, projected, cold = dict(kept["load"]), int(kept["projected"]), float(kept["cold_walk_s"])
            console.print(f"{backend}: reusing the {projected:,} projected events loaded at {kept['now']} ({marker})")
        shape = data.site_shape()
        reports = Reports(store, clock=lambda: now)
        t0 = time.perf_counter()
        status_ = reports.chains.check(shape.agents)
        first_check = time.perf_counter() - t0
        console.print(f"{backend}: background walk {cold:.1f} s; a fresh worker's first check {first_check:.3f} s")
        if not status_.ok:
            raise RuntimeError(f"chains do not verify: {status_.problems[:3]}")
        with console.status(f"{backend}: timing queries"):
            timings = time_queries(reports, shape, now, opts.rounds, opts.deep_pages)
        pages: dict[str, Any] = {}
        if opts.http:
            with console.status(f"{backend}: timing HTTP pages"):
                pages = time_pages(store, shape, root, now, max(5, opts.rounds // 2))
        csv: list[dict[str, Any]] = []
        with console.status(f"{backend}: CSV exports in subprocesses"):
            for rows in sorted({max(1, opts.csv_rows // 10), opts.csv_rows}):
                csv.append(csv_peak(url, rows, now, key_path))
        return BackendResult(
            backend,
            _counts(store)["events"],
            {**load, "first_check_s": first_check},
            projected,
            _counts(store),
            cold,
            timings,
            pages,
            csv,
        )
    finally:
        engine.dispose()


def _table(r: BackendResult) -> Table:
    table = Table(
        "reading",
        "page",
        "rows",
        "p50 ms",
        "p95 ms",
        "bare SQL p50",
        "bare SQL p95",
        title=f"bench registers — {r.backend}, {r.events:,} events",
    )
    for t in r.timings:
        mark = "" if t.p95 <= QUERY_GOAL_MS else " ✗"
        table.add_row(
            t.query,
            t.depth,
            str(t.rows),
            f"{t.p50:.1f}",
            f"{t.p95:.1f}{mark}",
            f"{t.base_p50:.1f}",
            f"{t.base_p95:.1f}",
        )
    for kind in ("html", "json"):
        values = r.pages.get(kind) or []
        if values:
            table.add_row(
                f"HTTP {kind} pages (all readings)",
                "first",
                "",
                f"{_p(values, 0.5):.1f}",
                f"{_p(values, 0.95):.1f}",
                "",
                "",
            )
    return table


def summary(results: list[BackendResult]) -> dict[str, Any]:
    """Return the one-line JSON: the worst backend's p95s, and per-backend figures."""

    def worst(pick: Callable[[BackendResult], list[float]]) -> float:
        return round(max((max(pick(r)) for r in results if pick(r)), default=0.0), 1)

    per: dict[str, Any] = {}
    for r in results:
        regs = [t for t in r.timings if not t.query.startswith("timeline")]
        lines = [t for t in r.timings if t.query.startswith("timeline")]
        pages = (r.pages.get("html") or []) + (r.pages.get("json") or [])
        per[r.backend] = {
            "query_p95_ms": round(max(t.p95 for t in regs), 1),
            "timeline_p95_ms": round(max(t.p95 for t in lines), 1),
            "page_p95_ms": round(_p(pages, 0.95), 1) if pages else None,
            # A page that failed is not in page_p95_ms: it is named here, so a 404 cannot pass for a fast page.
            "http_failures": list(r.pages.get("failures") or []),
            "bare_sql_p95_ms": round(max(t.base_p95 for t in r.timings), 1),
            "csv_peak_rss_mb": round(r.csv[-1]["peak_kb"] / 1024, 1),
            "csv_rss_ratio": round(r.csv[-1]["peak_kb"] / r.csv[0]["peak_kb"], 2),
            "cold_walk_s": round(r.cold_walk_s, 1),
            "first_check_s": round(r.load["first_check_s"], 3),
            "load_s": round(r.load["load_s"]),
            "project_s": round(r.load["project_s"]),
        }
    pages_all = [v for r in results for v in (r.pages.get("html") or []) + (r.pages.get("json") or [])]
    return {
        "rows": min(r.events for r in results),
        "query_p95_ms": worst(lambda r: [t.p95 for t in r.timings if not t.query.startswith("timeline")]),
        "timeline_p95_ms": worst(lambda r: [t.p95 for t in r.timings if t.query.startswith("timeline")]),
        "page_p95_ms": round(_p(pages_all, 0.95), 1) if pages_all else None,
        "csv_peak_rss_mb": round(max(r.csv[-1]["peak_kb"] for r in results) / 1024, 1),
        "csv_rows": max(r.csv[-1]["rows"] for r in results),
        "backends": per,
    }


def run_registers_bench(opts: Options, console: Console) -> int:
    """Run the bench on each backend; print tables and the JSON line; return the exit code."""
    root = opts.workdir or Path(tempfile.mkdtemp(prefix="sekisho-bench-registers-"))
    root.mkdir(parents=True, exist_ok=True)
    results: list[BackendResult] = []
    try:
        for backend in opts.backends:
            fresh = not (opts.keep and (root / f"{backend}.loaded.json").exists())
            if backend == "sqlite":
                path = root / "registers.sqlite3"
                if fresh:
                    path.unlink(missing_ok=True)
                results.append(run_backend("sqlite", f"sqlite:///{path}", opts, root, console))
                if not opts.keep:
                    path.unlink(missing_ok=True)
            else:
                keep_in = None
                if opts.keep:
                    keep_in = root / "postgres"
                    root.chmod(root.stat().st_mode | 0o011)  # the cluster runs as postgres when we are root
                with (
                    postgres_cluster(keep_in=keep_in) as cluster,
                    pg_database(cluster, name="sekisho_bench" if opts.keep else None, fresh=fresh) as url,
                ):
                    results.append(run_backend("postgres", url, opts, root, console))
            r = results[-1]
            console.print(_table(r))
            csv = ", ".join(f"{c['rows']:,} rows {c['peak_kb'] / 1024:.1f} MiB" for c in r.csv)
            console.print(
                f"CSV peak RSS (VmHWM, fresh process): {csv}; first walk of every chain "
                f"{r.cold_walk_s:.1f} s; register rows {r.register_rows}"
            )
            if r.pages.get("failures"):
                console.print(f"HTTP failures: {r.pages['failures']}")
    finally:
        if opts.workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(summary(results), ensure_ascii=False))
    return 0
