"""The alert rules: what each one fires on, its defaults, and the signals events and conditions give.

A rule never writes anything: it turns one stored event (``event_signals``) or the fleet's state
(controller/alerts/conditions.py) into ``Signal``s, and the alert book (book.py) groups them into alerts.
A signal either raises (one more occurrence: a new alert, or a repeat counted on the live one) or clears
(the condition behind the alert ended: shown as "condition cleared", which is not "resolved").

The dedup key is the rule and the labels that name its subject (``key``): one live alert per forced
door, per agent offline, per person's failed-login burst; ``labels`` adds what is shown (names, area).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from sekisho.protocol.alert_policy import RULE_IDS, RuleSettings, Severity
from sekisho.protocol.policy import SitePolicy

Condition = Literal["active", "none"]
# What a rule is about, for the labels: an event's subject or a fleet condition's.
LABEL_KEYS = ("site", "area", "door", "reader", "slot", "person", "agent", "terminal", "device", "chain")


@dataclass(frozen=True)
class RuleDef:
    """A rule's defaults: severity, whether it has a condition that can clear, and its thresholds."""

    id: str
    severity: Severity
    condition: Condition
    threshold: int | None = None
    window_minutes: int | None = None
    debounce_s: int = 300
    # The procedure shown with the alert: catalogue message ids (controller/alerts/texts.py).
    group: Literal["door", "usb", "login", "register", "fleet", "integrity"] = "door"


RULES: dict[str, RuleDef] = {
    r.id: r
    for r in (
        RuleDef("door_forced", "critical", "active"),
        RuleDef("door_held_open", "high", "active"),
        RuleDef("door_tamper", "critical", "active"),
        RuleDef("reader_offline", "high", "active"),
        RuleDef("reader_fault", "high", "active"),
        RuleDef("board_offline", "high", "active"),
        RuleDef("relay_fault", "high", "active"),
        RuleDef("key_misuse", "medium", "none"),
        RuleDef("passback", "medium", "none"),
        RuleDef("visitor_without_escort", "high", "none"),
        RuleDef("access_outside_schedule", "medium", "none"),
        RuleDef("usb_blocked", "medium", "none", group="usb"),
        RuleDef("usb_rejected", "high", "none", group="usb"),
        RuleDef("usb_write_attempt", "high", "none", group="usb"),
        RuleDef("login_failures_person", "high", "none", threshold=5, window_minutes=10, group="login"),
        RuleDef("login_failures_terminal", "high", "none", threshold=10, window_minutes=10, group="login"),
        RuleDef("session_lock_failed", "high", "none", group="login"),
        RuleDef("key_overdue", "medium", "active", group="register"),
        RuleDef("medium_overdue", "medium", "active", group="register"),
        RuleDef("agent_stale", "low", "active", group="fleet"),
        RuleDef("agent_offline", "high", "active", group="fleet"),
        RuleDef("clock_skew", "medium", "active", threshold=60, group="fleet"),
        RuleDef("outbox_backlog", "medium", "active", threshold=1000, group="fleet"),
        RuleDef("policy_not_applied", "medium", "active", window_minutes=15, group="fleet"),
        RuleDef("cert_expiring", "high", "active", group="fleet"),
        RuleDef("sequence_gap", "critical", "active", group="integrity"),
        RuleDef("signature_failure", "critical", "none", group="integrity"),
        RuleDef("chain_broken", "critical", "active", group="integrity"),
        RuleDef("ingest_stalled", "critical", "active", threshold=120, group="integrity"),
    )
}
if set(RULES) != set(RULE_IDS):  # a rule added to one and not the other would be unconfigurable or dead
    raise RuntimeError("the rule catalogue and the policy's RULE_IDS must name the same rules")

# An offline door agent suppresses the alarms about its own devices being offline (inhibition).
INHIBITED_BY_AGENT_OFFLINE = frozenset({"reader_offline", "board_offline", "reader_fault", "agent_stale"})


@dataclass(frozen=True)
class Effective:
    """A rule's settings in force: its defaults overlaid with the policy's ``alerts.rules`` entry."""

    rule: RuleDef
    enabled: bool
    severity: Severity
    escalation: str | None
    threshold: int | None
    window_minutes: int | None
    debounce_s: int


def effective(rule_id: str, settings: Mapping[str, RuleSettings], default_escalation: str | None) -> Effective:
    """Return the settings in force for one rule."""
    rule = RULES[rule_id]
    site = settings.get(rule_id, RuleSettings())
    return Effective(
        rule=rule,
        enabled=site.enabled,
        severity=site.severity or rule.severity,
        escalation=site.escalation or default_escalation,
        threshold=site.threshold if site.threshold is not None else rule.threshold,
        window_minutes=site.window_minutes if site.window_minutes is not None else rule.window_minutes,
        debounce_s=site.debounce_s if site.debounce_s is not None else rule.debounce_s,
    )


@dataclass(frozen=True)
class Signal:
    """One occurrence (or the end) of a rule's condition for one subject."""

    rule: str
    key: tuple[tuple[str, str], ...]
    at: datetime
    labels: dict[str, str] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    event_id: int | None = None
    clears: bool = False

    @property
    def dedup_key(self) -> str:
        """Return the rule and its subject as one text: one live alert per value."""
        return self.rule + "|" + "|".join(f"{k}={v}" for k, v in self.key)


def signal(
    rule: str,
    at: datetime,
    key: Mapping[str, Any],
    labels: Mapping[str, Any] | None = None,
    *,
    params: Mapping[str, Any] | None = None,
    event_id: int | None = None,
    clears: bool = False,
) -> Signal:
    """Build a signal; the key's labels are shown too, values as text, empty ones dropped."""
    keyed = tuple(sorted((k, str(v)) for k, v in key.items() if v is not None and v != ""))
    shown = {k: str(v) for k, v in {**key, **(labels or {})}.items() if v is not None and v != ""}
    return Signal(rule, keyed, at, shown, dict(params or {}), event_id, clears)


@dataclass(frozen=True)
class Site:
    """What the rules take from the policy in force: where doors and terminals are, and the site's name."""

    name: str
    door_area: dict[str, str]
    door_agent: dict[str, str]
    terminal_area: dict[str, str]
    agent_terminal: dict[str, str]

    @classmethod
    def of(cls, policy: SitePolicy | None) -> Site:
        """Index a policy (None: no policy yet; events still raise alerts from their own fields)."""
        if policy is None:
            return cls("", {}, {}, {}, {})
        return cls(
            name=policy.site.name,
            door_area={d.id: d.area for d in policy.doors if d.area},
            door_agent={d.id: d.agent for d in policy.doors},
            terminal_area={t.id: t.area for t in policy.terminals if t.area},
            agent_terminal={t.agent: t.id for t in policy.terminals},
        )


# door.alarm kinds → rule (the alarm's subject names the dedup key: a door, a reader, or the board).
_ALARM_RULES: dict[str, str] = {
    "forced_open": "door_forced",
    "held_open": "door_held_open",
    "tamper": "door_tamper",
    "reader_offline": "reader_offline",
    "reader_sc_failed": "reader_fault",
    "reader_flood": "reader_fault",
    "board_offline": "board_offline",
    "relay_fault": "relay_fault",
    "key_taken_without_grant": "key_misuse",
    "key_wrong_slot": "key_misuse",
    "passback": "passback",
}
_DENIAL_RULES: dict[str, str] = {
    "passback": "passback",
    "visitor_without_escort": "visitor_without_escort",
    "escort_not_allowed": "visitor_without_escort",
    "outside_hours": "access_outside_schedule",
    "holiday": "access_outside_schedule",
    "exception_day": "access_outside_schedule",
}
_USB_RULES = {"usb.blocked": "usb_blocked", "usb.rejected": "usb_rejected", "usb.write_attempt": "usb_write_attempt"}
# The event types the rules read (the engine reads nothing else from the events table).
EVENT_TYPES = frozenset(
    {"door.alarm", "door.alarm_cleared", "door.access_denied", "login.denied", "session.lock_failed", *_USB_RULES}
)


def _text(payload: Mapping[str, Any], name: str) -> str | None:
    value = payload.get(name)
    return value if isinstance(value, str) and value else None


def _alarm_key(agent: str, payload: Mapping[str, Any]) -> dict[str, Any]:
    """The subject of a door alarm: the board for board alarms, the reader for reader alarms, else the door."""
    alarm = payload.get("alarm")
    if alarm == "board_offline":
        return {"agent": agent}
    if alarm in ("reader_offline", "reader_sc_failed", "reader_flood") or (alarm == "tamper" and payload.get("reader")):
        return {"agent": agent, "reader": _text(payload, "reader")}
    return {"door": _text(payload, "door")}


def event_signals(
    site: Site, event_pk: int, agent: str, type_: str, at: datetime, payload: Mapping[str, Any]
) -> list[Signal]:
    """Return the signals one stored event gives (bursts of failed logins are counted by the engine)."""
    door = _text(payload, "door")
    where = {"site": site.name, "agent": agent, "door": door, "area": site.door_area.get(door or "")}
    if type_ in ("door.alarm", "door.alarm_cleared"):
        rule = _ALARM_RULES.get(str(payload.get("alarm")))
        if rule is None:
            return []
        clears = type_ == "door.alarm_cleared"
        if clears and RULES[rule].condition != "active":
            return []
        labels = {**where, "person": _text(payload, "person"), "reader": _text(payload, "reader")}
        if payload.get("slot") is not None:
            labels["slot"] = payload.get("slot")
        params = {"alarm": payload.get("alarm"), "detail": str(payload.get("detail", ""))[:300]}
        return [signal(rule, at, _alarm_key(agent, payload), labels, params=params, event_id=event_pk, clears=clears)]
    if type_ == "door.access_denied":
        rule = _DENIAL_RULES.get(str(payload.get("reason")))
        if rule is None:
            return []
        person = _text(payload, "person")
        # One alert per door and person (an unknown card: per door), repeats counted.
        key = {"door": door, "person": person}
        return [signal(rule, at, key, where, params={"reason": payload.get("reason")}, event_id=event_pk)]
    terminal = _text(payload, "terminal") or site.agent_terminal.get(agent)
    at_terminal = {
        "site": site.name,
        "agent": agent,
        "terminal": terminal,
        "area": site.terminal_area.get(terminal or ""),
    }
    if type_ == "login.denied" and payload.get("reason") == "outside_hours":
        key = {"terminal": terminal, "person": _text(payload, "person") or _text(payload, "user")}
        return [
            signal(
                "access_outside_schedule", at, key, at_terminal, params={"reason": "outside_hours"}, event_id=event_pk
            )
        ]
    if type_ == "session.lock_failed":
        key = {"terminal": terminal, "user": _text(payload, "user")}
        params = {"action": payload.get("action"), "detail": str(payload.get("detail", ""))[:300]}
        return [signal("session_lock_failed", at, key, at_terminal, params=params, event_id=event_pk)]
    if type_ in _USB_RULES:
        # One alert per terminal and device (by its descriptor hash), repeats of the same stick counted.
        key = {"terminal": terminal, "device": _text(payload, "device_hash")}
        labels = {**at_terminal, "person": _text(payload, "person")}
        fields = ("reason", "vendor_product", "serial_masked", "medium", "loan", "block_device", "detected_by")
        params = {k: payload[k] for k in fields if payload.get(k) is not None}
        return [signal(_USB_RULES[type_], at, key, labels, params=params, event_id=event_pk)]
    return []


def burst_subjects(
    site: Site, agent: str, payload: Mapping[str, Any]
) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """For a denied login: the (rule, key, labels) of each burst it counts towards (person, terminal)."""
    terminal = _text(payload, "terminal") or site.agent_terminal.get(agent)
    labels = {"site": site.name, "agent": agent, "terminal": terminal, "area": site.terminal_area.get(terminal or "")}
    person = _text(payload, "person")
    out: list[tuple[str, dict[str, Any], dict[str, Any]]] = []
    if person is not None:
        out.append(("login_failures_person", {"person": person}, labels))
    if terminal is not None:
        out.append(("login_failures_terminal", {"terminal": terminal}, labels))
    return out
