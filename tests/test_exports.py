"""CSV and PDF exports of the registers (controller/reports/exports.py), read back: BOM, Japanese names intact,
rows matching the filter, preamble with filter, exporter, time and verification, formula cells neutralised,
the export recorded in the admin trail before any byte; PDF text via pypdf with the CJK font embedded; and
the CSV's peak memory flat in the row count (10k vs 100k rows, measured in subprocesses)."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import textwrap
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from pypdf import PdfReader
from reports_fixtures import T0, Site

from sekisho.controller.reports.exports import BOM, ExportSummary, audit_hook, export_csv, export_pdf
from sekisho.controller.reports.filters import Filter
from sekisho.controller.reports.timelines import Subject
from sekisho.controller.store import Store

if TYPE_CHECKING:
    from store_fixtures import MakeAgent

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def site(store: Store, make_agent: MakeAgent) -> Site:
    s = Site(store, make_agent)
    s.pass_door("p-0001", "entry", T0)
    s.pass_door("p-0003", "entry", T0 + timedelta(minutes=1))
    s.deny("p-0004", T0 + timedelta(minutes=2))
    s.pass_door("p-0001", "exit", T0 - timedelta(days=3))  # outside "today"
    s.usb("usb.inserted", T0 + timedelta(minutes=3), person="p-0001", product='=HYPERLINK("x")')
    s.take("p-0002", 0, "k-archive", T0 + timedelta(minutes=4), hours=1)
    s.project()
    s.clock.now = T0 + timedelta(hours=2)
    return s


def read_csv(data: bytes) -> list[list[str]]:
    assert data.startswith(BOM) and not data[len(BOM) :].startswith(BOM)
    return list(csv.reader(io.StringIO(data[len(BOM) :].decode("utf-8"), newline="")))


def test_csv_reads_back_with_bom_names_filter_and_verification(site: Site) -> None:
    flt = Filter.for_period("today", site.clock.now, area="a-hr-room")
    told: list[ExportSummary] = []
    chunks = export_csv(
        site.reports.reading("rooms", flt),
        exporter="user:somu (総務 一郎)",
        exported_at=site.clock.now,
        on_export=told.append,
    )
    first = next(chunks)
    assert told and told[0].rows == 3 and told[0].format == "csv"  # told before the first byte left
    assert told[0].filters["area"] == "a-hr-room" and told[0].filters["preset"] == "today"
    rows = read_csv(first + b"".join(chunks))
    assert rows[0] == ["入退室記録簿 / Room entry/exit log"]
    preamble = {r[0]: r[1:] for r in rows[1 : rows.index([])]}
    assert preamble["期間 / period"] == ["2026-11-17T00:00:00+09:00 – 2026-11-18T00:00:00+09:00 (今日 / today)"]
    assert preamble["区域 / area"] == ["人事部 管理区域 (a-hr-room)"]
    assert preamble["出力日時 / exported at"] == ["2026-11-17T11:00:00+09:00"]
    assert preamble["出力者 / exported by"] == ["user:somu (総務 一郎)"]
    assert (
        preamble["検証 / verification"][0].startswith("検証済み") and "Verified" in preamble["検証 / verification"][1]
    )
    header = rows[rows.index([]) + 1]
    assert header[:4] == ["日時 / time", "区域 / area", "区域ID / area id", "扉 / door"]
    data = rows[rows.index([]) + 2 : -1]
    person = header.index("氏名 / person")
    assert [r[person] for r in data] == [
        "仮名 三郎（かめい さぶろう）",
        "試験 次郎（しけん じろう）",
        "見本 太郎（みほん たろう）",
    ]
    assert [r[person + 1] for r in data] == ["p-0004", "p-0003", "p-0001"]
    assert [r[0] for r in data] == [
        "2026-11-17T09:02:00+09:00",
        "2026-11-17T09:01:00+09:00",
        "2026-11-17T09:00:00+09:00",
    ]
    assert rows[-1] == ["以上 3件 / end, 3 rows"]


def test_csv_neutralises_formulas_and_records_the_export_in_the_admin_trail(site: Site) -> None:
    hook = audit_hook(site.store, actor="user:somu", via="web", client="192.0.2.10")
    data = b"".join(
        export_csv(
            site.reports.reading("usb", Filter()), exporter="user:somu", exported_at=site.clock.now, on_export=hook
        )
    )
    rows = read_csv(data)
    device = rows[rows.index([]) + 1].index("機器 / device")
    cell = rows[rows.index([]) + 2][device]
    assert cell == '0781:5581 =HYPERLINK("x")'  # not at the start of the cell: harmless
    # A cell that starts with "=" gets a leading quote.
    from sekisho.controller.reports.exports import _safe

    assert _safe('=HYPERLINK("x")') == '\'=HYPERLINK("x")' and _safe("-1") == "'-1" and _safe("見本") == "見本"
    [entry] = site.store.list_admin(action="export.csv")
    assert entry.actor == "user:somu" and entry.target == "usb" and entry.detail["rows"] == 1
    assert entry.detail["verification"].startswith("Verified")


def test_key_register_and_timeline_csv(site: Site) -> None:
    data = b"".join(export_csv(site.reports.reading("keys", Filter()), exporter="x", exported_at=site.clock.now))
    rows = read_csv(data)
    body = rows[rows.index([]) + 2 : -1]
    header = rows[rows.index([]) + 1]
    assert [r[header.index("状態 / state")] for r in body] == ["延滞 / overdue"]
    assert body[0][header.index("鍵 / key")] == "書庫の鍵" and body[0][header.index("借用者 / borrower")].startswith(
        "見本 花子"
    )
    reading = site.reports.timeline_reading(Subject("person", "p-0001"), Filter())
    rows = read_csv(b"".join(export_csv(reading, exporter="x", exported_at=site.clock.now)))
    assert rows[0][0].startswith("個人のタイムライン: 見本 太郎（みほん たろう） [人事部]")
    assert len(rows[rows.index([]) + 2 : -1]) == 3 == reading.count  # entry, exit 3 days ago, USB


def test_pdf_has_names_filter_verification_and_the_cjk_font(site: Site) -> None:
    flt = Filter.for_period("today", site.clock.now, area="a-hr-room")
    told: list[ExportSummary] = []
    pdf = export_pdf(
        site.reports.reading("rooms", flt), exporter="user:somu", exported_at=site.clock.now, on_export=told.append
    )
    assert told and told[0].format == "pdf"
    reader = PdfReader(io.BytesIO(pdf))
    page = reader.pages[0]
    assert page.mediabox.width < page.mediabox.height and round(float(page.mediabox.width)) == 595  # A4 portrait
    text = "".join(p.extract_text() for p in reader.pages)
    for expected in (
        "入退室記録簿",
        "見本 太郎",
        "試験 次郎",
        "人事部 管理区域",
        "検証済み",
        "Verified",
        "user:somu",
        "1 / 1",
    ):
        assert expected in text, expected
    assert "2026/11/17" in text and "確認者" in text
    fonts = [f.get_object() for p in reader.pages for f in p["/Resources"]["/Font"].values()]
    assert fonts and all("Noto-Sans-CJK-JP" in str(f["/BaseFont"]) for f in fonts), fonts
    for font in fonts:  # embedded (a subset, "ABCDEF+" prefix), never left to the viewer's fonts
        descriptor = font["/DescendantFonts"][0].get_object()["/FontDescriptor"].get_object()
        assert "+" in str(font["/BaseFont"]) and any(k in descriptor for k in ("/FontFile", "/FontFile2", "/FontFile3"))


def test_pdf_caps_rows_with_a_note(site: Site) -> None:
    for i in range(6):
        site.locker("p-0001", T0 + timedelta(minutes=10 + i))
    site.project()
    pdf = export_pdf(site.reports.reading("lockers", Filter()), exporter="x", exported_at=site.clock.now, max_rows=4)
    text = "".join(p.extract_text() for p in PdfReader(io.BytesIO(pdf)).pages)
    flat = text.replace("\n", " ")
    assert "先頭4件のみ" in flat and "全6件" in flat and "export CSV for all rows" in flat, text


# --- memory: flat in the row count --------------------------------------------------------------------------

_FILL = textwrap.dedent(
    """
    import sys
    from datetime import datetime, timedelta, timezone
    from pathlib import Path
    from sqlalchemy import insert
    from sekisho.controller.policy.loader import parse_policy
    from sekisho.controller.policy.service import PolicyService
    from sekisho.controller.store import Store, make_engine, upgrade
    from sekisho.controller.store.models import DoorLogEntry
    from sekisho.protocol import signing

    url, rows, site_yaml = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    upgrade(url)
    store = Store(make_engine(url))
    PolicyService(store, signing.generate_key()).apply(
        parse_policy(Path(site_yaml).read_text(encoding="utf-8")), source_sha256="0" * 64, created_by="test"
    )
    start = datetime(2026, 11, 1, tzinfo=timezone.utc)
    people = ["p-0001", "p-0002", "p-0003", "p-0004"]
    batch = []
    with store.engine.begin() as conn:
        for i in range(1, rows + 1):
            batch.append({
                "id": i, "event_id": f"{i:032x}", "agent_id": "door-hr-01", "type": "door.access_granted",
                "occurred_at": start + timedelta(seconds=i), "door": "room-hr", "door_kind": "room",
                "area": "a-hr-room", "person": people[i % 4], "card_masked": "****-0001",
                "reader": "rdr-hr-in", "direction": "entry", "reason": "doors.room-hr.allowed",
                "visitor": False, "passback": False,
            })
            if len(batch) == 5000:
                conn.execute(insert(DoorLogEntry), batch)
                batch.clear()
        if batch:
            conn.execute(insert(DoorLogEntry), batch)
    """
)

_EXPORT = textwrap.dedent(
    """
    import json, sys
    from datetime import datetime, timezone
    from sekisho.controller.reports.exports import export_csv
    from sekisho.controller.reports.filters import Filter
    from sekisho.controller.reports.service import Reports
    from sekisho.controller.store import Store, make_engine

    url = sys.argv[1]
    store = Store(make_engine(url))
    reports = Reports(store)
    now = datetime(2026, 12, 1, tzinfo=timezone.utc)
    # Warm up (imports, the names, one small export) so that only the export itself differs between runs.
    first_minute = Filter(person="p-0001", until=datetime(2026, 11, 1, 0, 1, tzinfo=timezone.utc))
    for _ in export_csv(reports.reading("rooms", first_minute), exporter="x", exported_at=now):
        pass
    def status(name):
        # VmHWM: this process's peak RSS (ru_maxrss would carry the parent's peak across exec).
        for line in open("/proc/self/status"):
            if line.startswith(name + ":"):
                return int(line.split()[1])
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark: the peak from here on is the export's
    before = status("VmRSS")
    size = 0
    for chunk in export_csv(reports.reading("rooms", Filter()), exporter="x", exported_at=now):
        size += len(chunk)
    peak = status("VmHWM")
    print(json.dumps({"before_kb": before, "peak_kb": peak, "bytes": size}))
    """
)


def _peak(tmp_path: Path, rows: int) -> dict[str, int]:
    url = f"sqlite:///{tmp_path / f'rss-{rows}.db'}"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    fill = [sys.executable, "-c", _FILL, url, str(rows), str(ROOT / "deploy" / "demo" / "site.yaml")]
    subprocess.run(fill, check=True, cwd=ROOT, env=env, timeout=300)
    out = subprocess.run(
        [sys.executable, "-c", _EXPORT, url], check=True, cwd=ROOT, env=env, timeout=600, capture_output=True, text=True
    )
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def test_csv_peak_memory_is_flat_in_the_row_count(tmp_path: Path) -> None:
    small = _peak(tmp_path, 10_000)
    large = _peak(tmp_path, 100_000)
    assert large["bytes"] > 9 * small["bytes"]  # ten times the rows really went out
    ratio = large["peak_kb"] / small["peak_kb"]
    growth = (large["peak_kb"] - large["before_kb"]) - (small["peak_kb"] - small["before_kb"])
    print(
        f"csv export peak RSS: 10k rows {small['peak_kb'] / 1024:.1f} MiB, 100k rows {large['peak_kb'] / 1024:.1f} MiB "
        f"(ratio {ratio:.2f}, extra growth for 90k more rows {growth / 1024:.1f} MiB)"
    )
    assert ratio < 1.5, (small, large)
    # Holding the rows would cost far more than this (a row object and its strings are well over 100 bytes).
    assert growth < 90_000 * 100 / 1024, (small, large)
