"""What people read about an alert: each rule's title and procedure, and the notification texts, in ja and en.

The messages live in the services' catalogue (sekisho/common/locale/*/cli.po); the console shows the same
titles and procedures. Placeholders name labels (``%(door)s``…) filled with what the alert knows, or "-".
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from sekisho.common.i18n import N_, Lang, gettext
from sekisho.protocol.schedules import JST

TITLES: dict[str, str] = {
    "door_forced": N_("Door forced open: %(door)s"),
    "door_held_open": N_("Door held open: %(door)s"),
    "door_tamper": N_("Tamper: %(door)s %(reader)s"),
    "reader_offline": N_("Card reader offline: %(reader)s on %(agent)s"),
    "reader_fault": N_("Card reader fault: %(reader)s on %(agent)s"),
    "board_offline": N_("Door board offline: %(agent)s"),
    "relay_fault": N_("Lock relay fault: %(door)s"),
    "key_misuse": N_("Key taken or returned wrongly: %(door)s"),
    "passback": N_("Anti-passback violation: %(person)s at %(door)s"),
    "visitor_without_escort": N_("Visitor without escort: %(person)s at %(door)s"),
    "access_outside_schedule": N_("Access outside schedule: %(person)s at %(door)s%(terminal)s"),
    "usb_blocked": N_("USB device blocked on %(terminal)s"),
    "usb_rejected": N_("USB device rejected (possible BadUSB) on %(terminal)s"),
    "usb_write_attempt": N_("Write to read-only medium on %(terminal)s"),
    "login_failures_person": N_("Repeated failed logins: %(person)s"),
    "login_failures_terminal": N_("Repeated failed logins on %(terminal)s"),
    "session_lock_failed": N_("Session lock failed on %(terminal)s"),
    "key_overdue": N_("Key overdue: %(person)s"),
    "medium_overdue": N_("Medium overdue: %(person)s"),
    "agent_stale": N_("Agent heartbeat late: %(agent)s"),
    "agent_offline": N_("Agent offline: %(agent)s"),
    "clock_skew": N_("Clock skew: %(agent)s"),
    "outbox_backlog": N_("Outbox backlog growing: %(agent)s"),
    "policy_not_applied": N_("Policy not applied: %(agent)s"),
    "cert_expiring": N_("Certificate expiring: %(agent)s"),
    "sequence_gap": N_("Possible tampering: events missing from %(agent)s"),
    "signature_failure": N_("Possible tampering: refused messages from %(agent)s"),
    "chain_broken": N_("Possible tampering: record chain broken (%(chain)s)"),
    "ingest_stalled": N_("Controller ingest stalled"),
}

PROCEDURES: dict[str, str] = {
    "door_forced": N_(
        "Send staff to the door now. Check the area for intruders and what was taken; review the door's "
        "timeline and camera. Do not resolve until the door is closed and checked."
    ),
    "door_held_open": N_(
        "Ask the person nearby to close the door, or send staff. Check nobody followed in. Resolve once closed."
    ),
    "door_tamper": N_(
        "Inspect the reader or the door board enclosure. Treat as a break-in attempt until shown otherwise."
    ),
    "reader_offline": N_("Check the reader's cable and power; the door works only from its other readers meanwhile."),
    "reader_fault": N_("Check the reader: a wrong secure-channel key, a plaintext reader or a flood of reads."),
    "board_offline": N_("Check the door board's link and power; the doors it drives stay in their fail mode."),
    "relay_fault": N_("The lock may not be where it should be: check the door by hand and call maintenance."),
    "key_misuse": N_("Check which key is where in the cabinet and who took it; correct the register if needed."),
    "passback": N_("Check whether a card was passed back or someone followed another person in."),
    "visitor_without_escort": N_("Find the visitor and the host; a visitor enters only with an escort."),
    "access_outside_schedule": N_("Confirm with the person or their manager why access was tried outside hours."),
    "usb_blocked": N_("Ask the terminal's user about the device; lend a registered medium if there is a need."),
    "usb_rejected": N_("Remove the device and keep it: it may be a malicious device posing as a keyboard."),
    "usb_write_attempt": N_("Find the medium and check what was written; report to the handling manager."),
    "login_failures_person": N_("Contact the person: a forgotten PIN, a wrong finger, or someone else trying."),
    "login_failures_terminal": N_("Check who is at the terminal; several people failing there is suspicious."),
    "session_lock_failed": N_("Lock the terminal by hand and check the session lock service on it."),
    "key_overdue": N_("Contact the borrower and get the key back; record the reason."),
    "medium_overdue": N_("Contact the borrower and get the medium back; record the reason."),
    "agent_stale": N_("Watch: the agent missed heartbeats. It becomes offline if it stays silent."),
    "agent_offline": N_("Check the device's power and network; events wait in its outbox until it is back."),
    "clock_skew": N_("Fix the device's time source (NTP); event times from it are unreliable meanwhile."),
    "outbox_backlog": N_("Check the device's link to the broker; its events are not reaching the controller."),
    "policy_not_applied": N_("Check the device: it still enforces an older policy."),
    "cert_expiring": N_("Renew the device's certificate before it expires (docs/fleet.md)."),
    "sequence_gap": N_("Events are missing from the device's sequence: check the device and its outbox."),
    "signature_failure": N_(
        "Messages were refused as forged, replayed or from a revoked key: check the device and who can reach "
        "the broker."
    ),
    "chain_broken": N_("A stored record was changed or removed: run `sekisho records verify` and preserve evidence."),
    "ingest_stalled": N_("The controller is not storing events: check its service, database and disk."),
}

SEVERITY_NAMES: dict[str, str] = {
    "critical": N_("Critical"),
    "high": N_("High"),
    "medium": N_("Medium"),
    "low": N_("Low"),
}
KIND_NAMES: dict[str, str] = {
    "opened": N_("New alert"),
    "escalated": N_("Escalated alert"),
    "retriggered": N_("Alert not resolved after acknowledgement"),
    "resolved": N_("Alert resolved"),
}


def _filled(labels: Mapping[str, Any]) -> dict[str, str]:
    names = ("door", "reader", "agent", "person", "terminal", "chain", "area", "site")
    return {name: str(labels.get(name) or "-") for name in names}


def title(lang: Lang, rule: str, labels: Mapping[str, Any]) -> str:
    """Return the alert's one-line title in a language."""
    values = _filled(labels)
    if rule == "access_outside_schedule" and labels.get("terminal"):
        values["terminal"] = " / " + values["terminal"]
    elif rule == "access_outside_schedule":
        values["terminal"] = ""
    return gettext(lang, TITLES[rule], **values)


def procedure(lang: Lang, rule: str) -> str:
    """Return what to do about an alert of this rule, in a language."""
    return gettext(lang, PROCEDURES[rule])


def notification_text(
    lang: Lang,
    kind: str,
    rule: str,
    severity: str,
    labels: Mapping[str, Any],
    count: int,
    at: datetime,
    url: str | None,
) -> tuple[str, str]:
    """Return a notification's subject and body in a language (no secrets, no raw payloads)."""
    head = gettext(lang, KIND_NAMES.get(kind, KIND_NAMES["opened"]))
    subject = f"[{gettext(lang, SEVERITY_NAMES[severity])}] {head}: {title(lang, rule, labels)}"
    lines = [
        title(lang, rule, labels),
        gettext(lang, "Severity: %(severity)s", severity=gettext(lang, SEVERITY_NAMES[severity])),
        gettext(lang, "First seen: %(at)s (JST)", at=at.astimezone(JST).strftime("%Y/%m/%d %H:%M:%S")),
        gettext(lang, "Occurrences: %(count)s", count=count),
    ]
    where = ", ".join(f"{k}={v}" for k, v in sorted(labels.items()) if k != "site")
    if where:
        lines.append(gettext(lang, "Where: %(where)s", where=where))
    lines += ["", gettext(lang, "What to do:"), procedure(lang, rule)]
    if url:
        lines += ["", url]
    return subject, "\n".join(lines)
