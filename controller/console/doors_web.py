"""Remote door commands for security staff (遠隔扉操作): unlock for N seconds, lock-down, back to normal.

Three steps, each a plain form (no script needed): choose the command, its target and a mandatory reason
(``/console/doors``); read it back on a confirmation page (``POST /console/doors/confirm``, nothing sent);
send it (``POST /console/doors/send``). Sending goes the CLI's way (controller/cli.py ``issue_command``):
the command is built with controller/doors/commands.py, signed with the controller's key, stored with its
admin audit row in one transaction — the operator being the AUTHENTICATED console user (``Actor.audit_name``),
the reason checked by the My Number guard — then published to the door agent's command topic over the
broker. The status page then shows each command's acknowledgement: executed or rejected (the agent's
``agent.command_executed`` / ``agent.command_rejected`` event), waiting, or expired unanswered.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Annotated, Any, Final

from fastapi import APIRouter, Form, HTTPException, Query, Request, Response, status
from fastapi.responses import RedirectResponse
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from sekisho.common.i18n import localize
from sekisho.controller.accounts.roles import Actor, Permission, require
from sekisho.controller.accounts.web import csrf_for
from sekisho.controller.audit.operators import api_operator
from sekisho.controller.console import nav, templating
from sekisho.controller.console.i18n import N_
from sekisho.controller.console.muster_web import reports_of
from sekisho.controller.console.overview_web import MODE_LABELS, door_states
from sekisho.controller.doors import commands
from sekisho.controller.mqtt import connect_blocking, make_client
from sekisho.controller.store.audit import refuse_free_text
from sekisho.controller.store.models import Event, IssuedCommand
from sekisho.controller.store.records import aware_utc
from sekisho.protocol import messages, mynumber, timefmt, topics
from sekisho.protocol.door_commands import LOCKDOWN, MAX_UNLOCK_S, NORMAL, UNLOCK
from sekisho.protocol.policy import SitePolicy

router = APIRouter(prefix="/console/doors", tags=["console"], include_in_schema=False)
nav.register(nav.NavItem("/console/doors", N_("Remote door commands"), Permission.DOORS_COMMAND, built=True))
Operator = Annotated[Actor, require(Permission.DOORS_COMMAND)]

ACTIONS: Final = {
    "unlock": (UNLOCK, N_("Unlock once")),
    "lockdown": (LOCKDOWN, N_("Lock down")),
    "normal": (NORMAL, N_("Back to normal")),
}
TARGET_PATTERN: Final = r"^(all|door:[A-Za-z0-9][A-Za-z0-9_.-]{0,63}|area:[A-Za-z0-9][A-Za-z0-9_.-]{0,63})$"
MAX_REASON: Final = 500
# A command the agent has not executed within this lifetime is refused by it as expired.
LIFETIME_S: Final = 60
ACK_TYPES: Final = ("agent.command_executed", "agent.command_rejected")

ActionForm = Annotated[str, Form(pattern=r"^(unlock|lockdown|normal)$")]
TargetForm = Annotated[str, Form(max_length=80, pattern=TARGET_PATTERN)]
SecondsForm = Annotated[int, Form(ge=1, le=MAX_UNLOCK_S)]
ReasonForm = Annotated[str, Form(max_length=MAX_REASON)]


class Refused(Exception):
    """A command the form asked for that cannot be built (bad target, empty reason, My Number…)."""


@dataclass(frozen=True)
class Asked:
    """What the operator asked for, as the forms carry it."""

    action: str
    target: str
    seconds: int
    reason: str


def _policy(request: Request) -> SitePolicy:
    row = request.app.state.sekisho.store.current_policy_version()
    if row is None:
        raise HTTPException(status.HTTP_409_CONFLICT, "ポリシーが未適用です / no site policy applied yet")
    return SitePolicy.model_validate(row.document)


def _requested_by(actor: Actor) -> str | None:
    # Carried to the door agent (an Ident on the wire): the login when it fits, else only the audit row names them.
    login = actor.login
    ok = login[:1].isalnum() and len(login) <= 64 and all(c.isalnum() or c in "_.-" for c in login)
    return login if ok and login.isascii() else None


def build(policy: SitePolicy, asked: Asked, actor: Actor) -> list[commands.DoorCommand]:
    """Build the door commands the form asks for, or raise Refused saying why."""
    reason = asked.reason.strip()
    if not reason:
        raise Refused("理由を入力してください / give a reason")
    try:
        refuse_free_text("door command", reason=reason)
    except mynumber.MyNumberFound as err:
        raise Refused(*err.args) from err  # the service's Message: shown in the page's language
    kind, _, ident = asked.target.partition(":")
    try:
        if asked.action == "unlock":
            if kind != "door":
                raise Refused("解錠は扉を一つ選んでください / an unlock is for one door")
            return [commands.unlock(policy, ident, asked.seconds, _requested_by(actor))]
        name = ACTIONS[asked.action][0]
        if kind == "door":
            return commands.set_mode(policy, name, doors=[ident])  # type: ignore[arg-type]
        if kind == "area":
            return commands.set_mode(policy, name, area=ident)  # type: ignore[arg-type]
        return commands.set_mode(policy, name, all_doors=True)  # type: ignore[arg-type]
    except commands.TargetError as err:
        raise Refused(*err.args) from err


def _form_context(request: Request, actor: Actor, asked: Asked | None, error: str | None) -> dict[str, Any]:
    reports = reports_of(request)
    directory = reports.directory()
    areas = sorted((ident, name) for ident, (name, _kind) in directory.areas.items())
    return {
        "doors": door_states(request),
        "areas": areas,
        "actions": ACTIONS,
        "mode_labels": MODE_LABELS,
        "asked": asked,
        "error": error,
        "max_seconds": MAX_UNLOCK_S,
        "csrf_token": csrf_for(request) if actor.via == "session" else "",
        "recent": recent_commands(request, limit=10),
        "state_labels": STATE_LABELS,
    }


@router.get("")
def doors_page(request: Request, actor: Operator) -> Response:
    """Show the doors and the command form."""
    return templating.render(request, "doors/form.html", _form_context(request, actor, None, None), viewer=actor)


@router.post("/confirm")
def confirm(
    request: Request, actor: Operator, action: ActionForm, target: TargetForm, reason: ReasonForm,
    seconds: SecondsForm = 5,
) -> Response:  # fmt: skip
    """Read the command back for confirmation (nothing is sent yet)."""
    asked = Asked(action, target, seconds, reason)
    try:
        built = build(_policy(request), asked, actor)
    except Refused as err:
        context = _form_context(request, actor, asked, localize(err, templating.language_of(request, actor)))
        return templating.render(request, "doors/form.html", context, viewer=actor, status_code=422)
    context = {
        **_form_context(request, actor, asked, None),
        "built": built,
        "action_label": ACTIONS[action][1],
        "target_label": _target_label(request, target),
        "lifetime_s": LIFETIME_S,
    }
    return templating.render(request, "doors/confirm.html", context, viewer=actor)


def _target_label(request: Request, target: str) -> str:
    directory = reports_of(request).directory()
    kind, _, ident = target.partition(":")
    if kind == "door":
        ref = directory.door(ident)
        return ref.name if ref else ident
    if kind == "area":
        ref = directory.area(ident)
        return ref.name if ref else ident
    return "全扉 / all doors"


def _publish(request: Request, agent: str, raw: bytes) -> None:
    config = request.app.state.sekisho.config
    # A short-lived client of its own (like the CLI's): the ingest worker's session is not shared with requests.
    client = make_client(config, f"{config.worker_id}-web-{secrets.token_hex(4)}")
    try:
        connect_blocking(client, config, persistent=False, timeout=5)
        info = client.publish(topics.topic(agent, topics.COMMANDS), raw, qos=1)
        info.wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


def send_one(request: Request, actor: Actor, command: commands.DoorCommand, reason: str) -> str:
    """Sign, record with the operator's audit row (one transaction) and publish one command; return its id."""
    state = request.app.state.sekisho
    key = state.signing_key
    if key is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "署名鍵を読めません / the signing key is unreadable")
    command_id, raw = messages.build_command(
        key, agent=command.agent, name=command.name, args=command.args, lifetime=timedelta(seconds=LIFETIME_S)
    )
    cmd = messages.open_command(raw, key.public_key(), command.agent)
    operator = api_operator(actor, actor.client)
    state.store.add_issued_command(
        command_id=command_id,
        agent_id=command.agent,
        name=command.name,
        args=command.args,
        issued_at=cmd.issued_at,
        expires_at=cmd.expires_at,
        nonce=cmd.command.nonce,
        audit=operator.action(
            "door.command",
            f"agent:{command.agent}",
            new={
                "command_id": command_id,
                "name": command.name,
                "args": command.args,
                "expires_at": timefmt.fmt(cmd.expires_at),
            },
            detail={"reason": reason},
        ),
    )
    _publish(request, command.agent, raw)
    return command_id


@router.post("/send")
async def send(
    request: Request, actor: Operator, action: ActionForm, target: TargetForm, reason: ReasonForm,
    confirmed: Annotated[str, Form(pattern=r"^yes$")], seconds: SecondsForm = 5,
) -> Response:  # fmt: skip
    """Send the confirmed command(s) and show their acknowledgement state."""
    del confirmed  # required: a send without the confirmation step's field is refused (422)
    asked = Asked(action, target, seconds, reason)
    try:
        built = build(_policy(request), asked, actor)
    except Refused as err:
        context = _form_context(request, actor, asked, localize(err, templating.language_of(request, actor)))
        return templating.render(request, "doors/form.html", context, viewer=actor, status_code=422)
    sent: list[str] = []
    failed: list[str] = []
    for command in built:
        try:
            sent.append(await run_in_threadpool(send_one, request, actor, command, reason.strip()))
        except (ConnectionError, OSError, RuntimeError, TimeoutError):
            failed.append(command.agent)
    if not sent:
        message = f"送れませんでした / not sent to: {', '.join(failed)} (the broker did not answer)"
        context = _form_context(request, actor, asked, message)
        return templating.render(request, "doors/form.html", context, viewer=actor, status_code=502)
    return RedirectResponse(f"/console/doors/commands?ids={','.join(sent)}", status_code=status.HTTP_303_SEE_OTHER)


@dataclass(frozen=True, slots=True)
class CommandState:
    """One issued command and what its agent answered."""

    id: str
    agent: str
    name: str
    args: dict[str, Any]
    issued_at: datetime
    expires_at: datetime
    state: str  # executed, rejected, waiting, expired
    detail: str | None


STATE_LABELS: Final = {
    "executed": ("ok", N_("Executed by the door agent")),
    "rejected": ("failed", N_("Rejected by the door agent")),
    "waiting": ("unknown", N_("Sent; waiting for the door agent")),
    "expired": ("failed", N_("No answer before it expired")),
}


def command_states(request: Request, ids: list[str]) -> list[CommandState]:
    """Return the issued commands named and their acknowledgement state from the agents' events."""
    store = request.app.state.sekisho.store
    now = request.app.state.sekisho.clock()
    with store.engine.connect() as conn:
        table = IssuedCommand.__table__
        issued = conn.execute(select(table).where(table.c.id.in_(ids))).all()
        out = []
        for cmd in sorted(issued, key=lambda c: (c.issued_at, c.id)):
            answers = conn.execute(
                select(Event.type, Event.payload)
                .where(
                    Event.agent_id == cmd.agent_id,
                    Event.type.in_(ACK_TYPES),
                    # The agent's clock may be a little off; its answer cannot come long before the command.
                    Event.occurred_at >= cmd.issued_at - timedelta(minutes=5),
                )
                .order_by(Event.id)
            ).all()
            found = next((a for a in answers if (a.payload or {}).get("command_id") == cmd.id), None)
            if found is not None:
                payload = found.payload or {}
                executed = found.type == "agent.command_executed"
                state = "executed" if executed else "rejected"
                detail = payload.get("result") if executed else payload.get("reason")
            else:
                state = "expired" if aware_utc(cmd.expires_at, "expires_at") < now else "waiting"
                detail = None
            out.append(
                CommandState(cmd.id, cmd.agent_id, cmd.name, dict(cmd.args), cmd.issued_at, cmd.expires_at, state,
                             str(detail) if detail is not None else None)
            )  # fmt: skip
    return out


def recent_commands(request: Request, limit: int = 10) -> list[CommandState]:
    """Return the newest door commands with their acknowledgement state."""
    store = request.app.state.sekisho.store
    with store.engine.connect() as conn:
        ids = (
            conn.execute(
                select(IssuedCommand.id)
                .where(IssuedCommand.name.like("door.%"))
                .order_by(IssuedCommand.issued_at.desc())
                .limit(limit)
            )
            .scalars()
            .all()
        )
    return list(reversed(command_states(request, list(ids))))


IdsQuery = Annotated[str, Query(max_length=33 * 64, pattern=r"^[A-Za-z0-9_-]{1,32}(,[A-Za-z0-9_-]{1,32}){0,63}$")]


def _status_context(request: Request, ids: str) -> dict[str, Any]:
    states = command_states(request, ids.split(","))
    if not states:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "指示がありません / no such command")
    return {
        "commands": states,
        "state_labels": STATE_LABELS,
        "ids": ids,
        "pending": any(c.state == "waiting" for c in states),
        "refresh_s": 2,
    }


@router.get("/commands")
def command_status(request: Request, actor: Operator, ids: IdsQuery) -> Response:
    """Show the commands just sent and whether their door agents executed them (refreshed live)."""
    return templating.render(request, "doors/status.html", _status_context(request, ids), viewer=actor)


@router.get("/commands/fragment")
def command_status_fragment(request: Request, actor: Operator, ids: IdsQuery) -> Response:
    """Return the acknowledgement table alone (htmx swaps it in every 2 s)."""
    return templating.render(request, "doors/status_table.html", _status_context(request, ids), viewer=actor)
