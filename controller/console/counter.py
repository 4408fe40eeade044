"""The key counter tablet: a facility manager lends and takes back plain keys kept outside an electronic cabinet.

The borrower confirms a loan with a signature drawn on the tablet (a canvas, static/counter.js; the CSP allows no
inline script), posted as a PNG data URL. Each lend and return is one write transaction holding both the admin
audit row and the key register line:

- the audit row (``key.counter.lend`` / ``key.counter.return``; hash-chained and sealed like every admin action)
  carries who lent what to whom, the due time, the signature's SHA-256 and, for a lend, the image itself;
- the key register line (``key_loans``, cabinet ``counter``) has the audit row's id, negated, as its id and no
  agent, so the register shows counter loans with the cabinet's (overdue first) and a rebuild of the door
  projection, which replays agent events only, keeps them (controller/doors/projector.py).

A card tap at a reader is not offered: the door agent has no "confirm" path a counter could ask for.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from datetime import datetime, timedelta
from typing import Annotated, Any, Final, cast

from fastapi import APIRouter, Form, HTTPException, Query, Request, status
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy import Table, insert, select, update

from sekisho.controller.accounts.audit_hook import VIA
from sekisho.controller.accounts.roles import Actor, Permission, require
from sekisho.controller.accounts.web import csrf_for
from sekisho.controller.console import templating
from sekisho.controller.console.formats import JST
from sekisho.controller.console.register_query import ID_PATTERN, half, reports_of
from sekisho.controller.reports.registers import COUNTER_CABINET
from sekisho.controller.store.audit import AdminAction, refuse_free_text
from sekisho.controller.store.db import write_transaction
from sekisho.controller.store.models import AdminAuditEntry, KeyLoan
from sekisho.protocol import mynumber

counter = APIRouter(prefix="/console/keys/counter", tags=["console"], include_in_schema=False)

LOANS = cast(Table, KeyLoan.__table__)
AUDIT = cast(Table, AdminAuditEntry.__table__)
PNG_PREFIX: Final = "data:image/png;base64,"
PNG_MAGIC: Final = b"\x89PNG\r\n\x1a\n"
# A signature drawn on a tablet canvas is a few KiB; the bound keeps the audit row small.
MAX_SIGNATURE_BYTES: Final = 64 * 1024
MAX_LOAN: Final = timedelta(days=30)
KEY_NAME: Final = re.compile(r"[^\x00-\x1f\x7f]{1,64}")
LEND: Final = "key.counter.lend"
RETURN: Final = "key.counter.return"


class CounterError(ValueError):
    """A lend or return that cannot be made as asked; the text is bilingual."""


def decode_signature(data_url: str) -> bytes:
    """Return the PNG bytes of a signature data URL, or raise CounterError (not PNG, empty or too large)."""
    if not data_url.startswith(PNG_PREFIX):
        raise CounterError("借用者の署名が必要です / the borrower's signature is needed")
    encoded = data_url[len(PNG_PREFIX) :]
    if len(encoded) > (MAX_SIGNATURE_BYTES * 4) // 3 + 4:
        raise CounterError("署名の画像が大きすぎます / the signature image is too large")
    try:
        image = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise CounterError("署名の画像が不正です / the signature image is not valid") from None
    if not image.startswith(PNG_MAGIC) or len(image) > MAX_SIGNATURE_BYTES:
        raise CounterError("署名の画像が不正です / the signature image is not valid")
    return image


def parse_due(text: str, now: datetime) -> datetime:
    """Return the due time of a `YYYY-MM-DDTHH:MM` JST input: after now and within 30 days."""
    try:
        due = datetime.fromisoformat(text).replace(tzinfo=JST)
    except ValueError:
        raise CounterError("返却予定の日時が不正です / the due time is not valid") from None
    if not now < due <= now + MAX_LOAN:
        raise CounterError("返却予定は今から30日以内で指定してください / the due time must be within 30 days")
    return due


def _operator(request: Request, actor: Actor) -> dict[str, Any]:
    return {
        "actor": actor.audit_name,
        "via": VIA.get(actor.via, "web"),
        "client": request.client.host if request.client else None,
    }


def lend(request: Request, actor: Actor, key: str, borrower: str, due_text: str, signature: str) -> int:
    """Lend a plain key: audit row (with the signature) and register line in one transaction; return its id."""
    reports = reports_of(request)
    now = reports.clock()
    key = key.strip()
    if not KEY_NAME.fullmatch(key):
        raise CounterError("鍵の名前を1〜64文字で入力してください / name the key in 1 to 64 characters")
    refuse_free_text("key loan", key=key)
    if not ID_PATTERN.fullmatch(borrower) or reports.directory().person_info(borrower) is None:
        raise CounterError("借用者を選んでください / choose the borrower")
    due = parse_due(due_text, now)
    image = decode_signature(signature)
    digest = hashlib.sha256(image).hexdigest()
    store = request.app.state.sekisho.store
    with write_transaction(store.engine) as conn:
        if conn.execute(
            select(LOANS.c.id).where(
                LOANS.c.cabinet == COUNTER_CABINET, LOANS.c.key == key, LOANS.c.returned_at.is_(None)
            )
        ).first():
            raise CounterError("この鍵は貸出中です / this key is out already")
        new = {"key": key, "borrower": borrower, "taken_at": now, "due_at": due, "signature_sha256": digest}
        entry = AdminAction(
            **_operator(request, actor),
            action=LEND,
            target=f"key:{COUNTER_CABINET}/{key}",
            new=new,
            detail={"signature_png": base64.b64encode(image).decode()},
        )
        audit_id = int(store.append_admin_in(conn, entry, now))
        conn.execute(
            insert(LOANS).values(
                id=-audit_id, agent_id="", cabinet=COUNTER_CABINET, slot=None, key=key, person=borrower,
                taken_at=now, due_at=due, wrong_slot=False, return_only=False,
            )
        )  # fmt: skip
    return -audit_id


def take_back(request: Request, actor: Actor, loan: int, returned_by: str | None) -> None:
    """Record a plain key's return (by the borrower unless someone else is named), with its audit row."""
    reports = reports_of(request)
    now = reports.clock()
    store = request.app.state.sekisho.store
    with write_transaction(store.engine) as conn:
        row = (
            conn.execute(select(LOANS).where(LOANS.c.id == loan, LOANS.c.cabinet == COUNTER_CABINET)).mappings().first()
        )
        if row is None:
            raise CounterError("その貸出はありません / no such counter loan")
        if row["returned_at"] is not None:
            raise CounterError("この鍵は返却済みです / this key was returned already")
        who = returned_by or row["person"]
        if who != row["person"] and (not ID_PATTERN.fullmatch(who) or reports.directory().person_info(who) is None):
            raise CounterError("返却者を選んでください / choose who returns the key")
        entry = AdminAction(
            **_operator(request, actor),
            action=RETURN,
            target=f"key-loan:{loan}",
            old={"key": row["key"], "borrower": row["person"], "returned_at": None},
            new={"returned_at": now, "returned_by": who},
        )
        store.append_admin_in(conn, entry, now)
        conn.execute(update(LOANS).where(LOANS.c.id == loan).values(returned_at=now, returned_by=who))


def _open_loans(request: Request) -> list[dict[str, Any]]:
    directory = reports_of(request).directory()
    with request.app.state.sekisho.store.engine.connect() as conn:
        rows = (
            conn.execute(
                select(LOANS)
                .where(LOANS.c.cabinet == COUNTER_CABINET, LOANS.c.returned_at.is_(None))
                .order_by(LOANS.c.due_at)
            )
            .mappings()
            .all()
        )
    now = reports_of(request).clock()
    return [
        {"id": r["id"], "key": r["key"], "person": directory.person(r["person"]), "taken_at": r["taken_at"],
         "due_at": r["due_at"], "overdue": r["due_at"] is not None and r["due_at"] <= now}
        for r in rows
    ]  # fmt: skip


def _page(request: Request, actor: Actor, *, error: str | None = None, done: str | None = None,
          status_code: int = 200) -> Response:  # fmt: skip
    reports = reports_of(request)
    directory = reports.directory()
    lang = templating.language_of(request, actor)
    people = sorted(
        ((p.id, p.name, p.kana) for p in directory.people.values() if not p.visitor), key=lambda p: (p[2] or p[1], p[0])
    )
    default_due = (reports.clock().astimezone(JST) + timedelta(hours=8)).strftime("%Y-%m-%dT%H:%M")
    context = {
        "people": people,
        "loans": _open_loans(request),
        "default_due": default_due,
        "error": half(error, lang) if error else None,
        "done": done,
        "csrf_token": csrf_for(request),
    }
    return templating.render(request, "registers/counter.html", context, viewer=actor, status_code=status_code)


@counter.get("", response_class=HTMLResponse, dependencies=[require(Permission.KEYS_LEND)])
def counter_page(request: Request, done: Annotated[str | None, Query(max_length=16)] = None) -> Response:
    """Show the counter: lend a plain key (borrower signs on the tablet), and the plain keys out now."""
    return _page(request, request.state.actor, done=done if done in ("lent", "returned") else None)


@counter.post("/lend", dependencies=[require(Permission.KEYS_LEND)])
def lend_form(
    request: Request,
    key: Annotated[str, Form(max_length=200)] = "",
    borrower: Annotated[str, Form(max_length=64)] = "",
    due: Annotated[str, Form(max_length=32)] = "",
    signature: Annotated[str, Form(max_length=(MAX_SIGNATURE_BYTES * 4) // 3 + 64)] = "",
) -> Response:
    """Lend a plain key to the borrower who signed (CSRF checked by require on every POST)."""
    actor: Actor = request.state.actor
    try:
        lend(request, actor, key, borrower, due, signature)
    except mynumber.MyNumberFound:
        return _page(request, actor, error="マイナンバーのような番号は入力できません / a number like a My Number "
                     "cannot be entered", status_code=422)  # fmt: skip
    except CounterError as err:
        return _page(request, actor, error=str(err), status_code=422)
    return RedirectResponse("/console/keys/counter?done=lent", status_code=303)


@counter.post("/return", dependencies=[require(Permission.KEYS_LEND)])
def return_form(
    request: Request,
    loan: Annotated[int, Form()],
    returned_by: Annotated[str, Form(max_length=64)] = "",
) -> Response:
    """Take a plain key back (by its borrower, or by the colleague named)."""
    actor: Actor = request.state.actor
    try:
        take_back(request, actor, loan, returned_by.strip() or None)
    except CounterError as err:
        return _page(request, actor, error=str(err), status_code=422)
    return RedirectResponse("/console/keys/counter?done=returned", status_code=303)


@counter.get("/{loan}/signature.png", dependencies=[require(Permission.REGISTERS_READ)])
def signature_image(request: Request, loan: int) -> Response:
    """Return the borrower's signature of a counter loan, checked against the SHA-256 recorded with it."""
    if loan >= 0:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "見つかりません / not found")
    with request.app.state.sekisho.store.engine.connect() as conn:
        row = conn.execute(
            select(AUDIT.c.new, AUDIT.c.detail).where(AUDIT.c.id == -loan, AUDIT.c.action == LEND)
        ).first()
    if row is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "見つかりません / not found")
    new, detail = row
    image = base64.b64decode((detail or {}).get("signature_png", ""))
    if hashlib.sha256(image).hexdigest() != (new or {}).get("signature_sha256"):
        raise HTTPException(
            status.HTTP_409_CONFLICT, "署名が記録と一致しません / the signature does not match its record"
        )
    return Response(image, media_type="image/png", headers={"Cache-Control": "no-store"})
