"""CSV and PDF exports of a register, timeline or muster list: filter, export time, exporter and verification printed.

CSV (what Excel opens without mojibake, documented in docs/registers.md):

- UTF-8 with a byte-order mark, CRLF line ends, every cell quoted when needed (the csv module's rules);
- a preamble of label/value rows: title, period, filter, exported at, exported by, verification (ja and en),
  rows at the start; one empty row; then ONE header row (``日本語 / English``, so Excel's filter and table
  work on a single row) and the data rows; last, a closing row ``以上 / end`` with the number of rows written;
- a column that names something (person, door, area, terminal, key, medium) is two columns: the name as shown
  on screen (a person as ``見本 太郎（みほん たろう）``) and its id;
- times in ISO 8601 with the JST offset (``2026-11-17T09:00:00+09:00``), which Excel and every parser read;
- a cell that starts with ``=``, ``+``, ``-``, ``@``, tab or CR is prefixed with ``'`` so a spreadsheet never
  runs it as a formula (a USB product name or a reason is text an attacker can choose).

The CSV is a generator of bytes: rows come from the keyset stream in chunks and are encoded a few hundred
at a time, so its memory does not grow with the row count.

PDF: an A4 portrait page like the paper forms (title, period, filter, printed by and at, page x / y, the
verification line and a sign-off line), rendered by WeasyPrint from templates/register.html with Noto Sans
CJK JP embedded (subset) from fontconfig. WeasyPrint lays out the whole document in memory, so a PDF holds
at most ``PDF_MAX_ROWS`` rows and says so on its first page when the result had more (the CSV has them all).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from itertools import islice
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, select_autoescape

from sekisho.controller.console.formats import install_filters, iso_jst, jst
from sekisho.controller.reports.directory import Directory
from sekisho.controller.reports.filters import PRESET_LABELS, Filter
from sekisho.controller.reports.labels import LOAN_STATES, MEDIUM_KINDS, MEDIUM_STATES, both, event_label
from sekisho.controller.reports.paging import Column, Ref, Row, Value
from sekisho.controller.reports.service import Reading

BOM = "\ufeff".encode()
# Measured (door log rows, A4, Noto Sans CJK JP): peak RSS grows about 0.2 MiB per row while WeasyPrint lays
# out the document (200 rows ≈ 250 MiB, 1,000 ≈ 420 MiB, 2,000 ≈ 630 MiB): a cap, not a stream, bounds it.
PDF_MAX_ROWS = 1000
_CSV_BATCH = 500
_TEMPLATES = Path(__file__).resolve().parent / "templates"
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


@dataclass(frozen=True, slots=True)
class ExportSummary:
    """What an export is, for the admin audit trail: told before its first byte leaves (fail closed)."""

    register: str
    format: str
    filters: dict[str, Any]
    rows: int
    verification: str
    exporter: str


ExportHook = Callable[[ExportSummary], None]


def audit_hook(store: Any, *, actor: str, via: str, client: str | None) -> ExportHook:
    """Return an on_export hook recording each export in the admin audit trail (store.record_export)."""

    def record(summary: ExportSummary) -> None:
        store.record_export(
            actor,
            via,
            client,
            register=summary.register,
            format=summary.format,
            filters=summary.filters,
            rows=summary.rows,
            verification=summary.verification,
        )

    return record


# --- shared pieces ---------------------------------------------------------------------------------


def filter_lines(flt: Filter, directory: Directory) -> list[tuple[str, str]]:
    """Return the filter as (label, value) lines in Japanese / English, names resolved."""
    lines: list[tuple[str, str]] = []
    if flt.person:
        lines.append(("人 / person", f"{directory.describe_person(flt.person)} ({flt.person})"))
    if flt.department:
        lines.append(("所属 / department", flt.department))
    for label, ident, look in (
        ("扉・ロッカー・保管庫 / door", flt.door, directory.door),
        ("区域 / area", flt.area, directory.area),
        ("端末 / terminal", flt.terminal, directory.terminal),
    ):
        if ident:
            ref = look(ident)
            lines.append((label, f"{ref.text() if ref else ident} ({ident})"))
    if flt.agent:
        lines.append(("エージェント / agent", flt.agent))
    if flt.medium:
        ref = directory.medium(flt.medium)
        lines.append(("媒体 / medium", f"{ref.text() if ref else flt.medium} ({flt.medium})"))
    if flt.kind:
        lines.append(("媒体の種類 / kind of medium", both(MEDIUM_KINDS.get(flt.kind, (flt.kind, flt.kind)))))
    if flt.label:
        lines.append(("名称に含む / name contains", flt.label))
    if flt.types:
        # The key register's types are loan states (延滞 / overdue …), the media register's medium states
        # (保管中 / in store …); the others' are event types.
        labels = (
            both(LOAN_STATES.get(t) or MEDIUM_STATES[t]) if t in LOAN_STATES or t in MEDIUM_STATES else event_label(t)
            for t in sorted(flt.types)
        )
        lines.append(("種別 / event types", ", ".join(labels)))
    return lines


def period_text(flt: Filter) -> str:
    """Return the period as printed: `2026-11-17T00:00:00+09:00 – 2026-11-18T00:00:00+09:00 (今日 / today)`."""
    if flt.since is None and flt.until is None:
        return "全期間 / all time"
    text = f"{iso_jst(flt.since) or '…'} – {iso_jst(flt.until) or '…'}"
    if flt.preset:
        ja, en = PRESET_LABELS[flt.preset]
        text += f" ({ja} / {en})"
    return text


def filter_dict(flt: Filter) -> dict[str, Any]:
    """Return the filter as plain JSON values (for the audit trail)."""
    return {
        key: value
        for key, value in (
            ("person", flt.person),
            ("department", flt.department),
            ("door", flt.door),
            ("area", flt.area),
            ("terminal", flt.terminal),
            ("agent", flt.agent),
            ("medium", flt.medium),
            ("kind", flt.kind),
            ("label", flt.label),
            ("types", sorted(flt.types) or None),
            ("since", iso_jst(flt.since) or None),
            ("until", iso_jst(flt.until) or None),
            ("preset", flt.preset),
        )
        if value is not None
    }


def _announce(reading: Reading, fmt: str, exporter: str, on_export: ExportHook | None) -> None:
    if on_export is not None:
        summary = ExportSummary(
            reading.spec.name,
            fmt,
            filter_dict(reading.filter),
            reading.count,
            reading.verification.text("en"),
            exporter,
        )
        on_export(summary)


# --- CSV ---------------------------------------------------------------------------------------------


def _safe(text: str) -> str:
    return "'" + text if text.startswith(_FORMULA_STARTS) else text


def _csv_cells(column: Column, value: Value) -> list[str]:
    if column.kind == "ref":
        if isinstance(value, Ref):
            return [_safe(value.text()), _safe(value.id)]
        return ["", ""] if value is None else [_safe(str(value)), ""]
    if value is None:
        return [""]
    if isinstance(value, datetime):
        return [iso_jst(value)]
    if isinstance(value, bool):
        return ["1" if value else "0"]
    return [_safe(str(value))]


def csv_header(columns: tuple[Column, ...]) -> list[str]:
    """Return the one header row: `日本語 / English`, and `…ID / … id` after each named column."""
    header: list[str] = []
    for c in columns:
        header.append(f"{c.ja} / {c.en}")
        if c.kind == "ref":
            header.append(f"{c.ja}ID / {c.en} id")
    return header


def export_csv(
    reading: Reading,
    *,
    exporter: str,
    exported_at: datetime,
    on_export: ExportHook | None = None,
) -> Iterator[bytes]:
    """Yield a register's CSV as bytes (BOM first), row chunk by row chunk; on_export is told before any byte."""
    _announce(reading, "csv", exporter, on_export)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")

    def flush() -> bytes:
        data = buffer.getvalue().encode("utf-8")
        buffer.seek(0)
        buffer.truncate()
        return data

    spec = reading.spec
    writer.writerow([_safe(f"{spec.ja} / {spec.en}")])
    writer.writerow(["期間 / period", period_text(reading.filter)])
    for label, value in filter_lines(reading.filter, reading.directory) or [("条件 / filter", "なし / none")]:
        writer.writerow([label, _safe(value)])
    writer.writerow(["出力日時 / exported at", iso_jst(exported_at)])
    writer.writerow(["出力者 / exported by", _safe(exporter)])
    writer.writerow(["検証 / verification", reading.verification.text("ja"), reading.verification.text("en")])
    writer.writerow(["件数（出力開始時） / rows at start", str(reading.count)])
    writer.writerow([])
    writer.writerow(csv_header(spec.columns))
    yield BOM + flush()
    written = 0
    while True:
        batch = list(islice(reading.rows, _CSV_BATCH))
        for row in batch:
            cells: list[str] = []
            for column in spec.columns:
                cells.extend(_csv_cells(column, row.values.get(column.key)))
            writer.writerow(cells)
        written += len(batch)
        if batch:
            yield flush()
        if len(batch) < _CSV_BATCH:
            break
    writer.writerow([f"以上 {written}件 / end, {written} rows"])
    yield flush()


# --- PDF ---------------------------------------------------------------------------------------------


def _environment() -> Environment:
    env = Environment(loader=FileSystemLoader(str(_TEMPLATES)), autoescape=select_autoescape(["html"]))
    install_filters(env)
    return env


def _pdf_cell(column: Column, value: Value) -> str:
    if value is None:
        return ""
    if isinstance(value, Ref):
        return value.text()
    if isinstance(value, datetime):
        return jst(value, "ja")
    return str(value)


def render_html(reading: Reading, *, exporter: str, exported_at: datetime, max_rows: int = PDF_MAX_ROWS) -> str:
    """Return the print HTML of a reading (at most max_rows rows, with a note when there were more)."""
    rows: list[Row] = list(islice(reading.rows, max_rows + 1))
    truncated = len(rows) > max_rows
    rows = rows[:max_rows]
    spec = reading.spec
    table = [[_pdf_cell(c, row.values.get(c.key)) for c in spec.columns] for row in rows]
    flags = [row.flags for row in rows]
    return (
        _environment()
        .get_template("register.html")
        .render(
            spec=spec,
            period=period_text(reading.filter),
            filters=filter_lines(reading.filter, reading.directory),
            exporter=exporter,
            exported_at=exported_at,
            verification=reading.verification,
            verification_ja=reading.verification.text("ja"),
            verification_en=reading.verification.text("en"),
            table=table,
            flags=flags,
            count=reading.count,
            truncated=truncated,
            max_rows=max_rows,
            site=reading.directory.site_name,
            lang="ja",
        )
    )


def export_pdf(
    reading: Reading,
    *,
    exporter: str,
    exported_at: datetime,
    on_export: ExportHook | None = None,
    max_rows: int = PDF_MAX_ROWS,
) -> bytes:
    """Return a register's PDF (A4 portrait, Noto Sans CJK JP embedded); on_export is told first."""
    from weasyprint import HTML  # heavy import (pango, cairo): only when a PDF is asked for

    _announce(reading, "pdf", exporter, on_export)
    html = render_html(reading, exporter=exporter, exported_at=exported_at, max_rows=max_rows)
    pdf = HTML(string=html, base_url=str(_TEMPLATES)).write_pdf()
    if pdf is None:  # write_pdf without a target returns the bytes
        raise RuntimeError("WeasyPrint returned no PDF")
    return bytes(pdf)
