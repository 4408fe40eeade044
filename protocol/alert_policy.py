"""The ``alerts`` section of the site policy: rule settings, contacts, duty rosters and escalation chains.

Signed with the rest of the policy (so who is told about a forced door is as tamper-evident as who may open
it) but never sent to an agent: ``AgentSlicer`` leaves it out. Channel secrets (the SMTP password, webhook
HMAC keys) are not here either: a contact names a webhook, and the URL and key live in the controller's
configuration (docs/alerts.md).

    alerts:
      contacts:
        - {id: guard-desk, name: 警備室, email: guard@example.invalid}
        - {id: soc, name: SOC, webhook: soc}
      rosters:
        - {id: duty, hours: office-hours, business: [guard-desk], after_hours: [night-guard], holiday: [night-guard]}
      escalations:
        - id: default
          steps:
            - {after_minutes: 0, notify: [roster:duty]}
            - {after_minutes: 10, notify: [sec-lead, soc]}
          repeat: 2
          ack_timeout_minutes: 60
      rules:
        door_forced: {severity: critical, escalation: default}
        login_failures_person: {threshold: 5, window_minutes: 10}
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Ident = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]
Name = Annotated[str, Field(min_length=1, max_length=100)]
RuleId = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,47}$")]
Severity = Literal["critical", "high", "medium", "low"]
SEVERITIES: tuple[Severity, ...] = ("critical", "high", "medium", "low")
# A step notifies contacts by id, or a roster's people on duty at that moment: "roster:<id>".
Recipient = Annotated[str, Field(pattern=r"^(roster:)?[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]
# Syntactic only (no DNS): a typo is caught when the policy is applied, delivery failures are recorded.
Email = Annotated[str, Field(pattern=r"^[^@\s<>\"]{1,64}@[A-Za-z0-9.-]{1,190}\.[A-Za-z0-9-]{2,}$", max_length=254)]


# Every rule the controller knows (controller/alerts/rules.py holds what each one fires on and its defaults).
RULE_IDS: tuple[str, ...] = (
    "door_forced",
    "door_held_open",
    "door_tamper",
    "reader_offline",
    "reader_fault",
    "board_offline",
    "relay_fault",
    "key_misuse",
    "passback",
    "visitor_without_escort",
    "access_outside_schedule",
    "usb_blocked",
    "usb_rejected",
    "usb_write_attempt",
    "login_failures_person",
    "login_failures_terminal",
    "session_lock_failed",
    "key_overdue",
    "medium_overdue",
    "agent_stale",
    "agent_offline",
    "clock_skew",
    "outbox_backlog",
    "policy_not_applied",
    "cert_expiring",
    "sequence_gap",
    "signature_failure",
    "chain_broken",
    "ingest_stalled",
)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Contact(_Model):
    """Someone (or a desk, a SIEM) told about alerts: by e-mail, a signed webhook, or both."""

    id: Ident
    name: Name
    email: Email | None = None
    webhook: Ident | None = Field(default=None, description="a webhook named in the controller's configuration")
    language: Literal["ja", "en"] = "ja"


class Roster(_Model):
    """Who is on duty: the business-hours contacts inside a schedule, others outside it and on holidays (JST)."""

    id: Ident
    hours: Ident = Field(description="the schedule (policy `schedules`) that makes the business hours")
    business: list[Ident] = Field(min_length=1)
    after_hours: list[Ident] = Field(min_length=1)
    holiday: list[Ident] | None = Field(default=None, description="Japanese public holidays (default: after_hours)")


class Step(_Model):
    """One escalation step: whom to notify, this many minutes after the alert opened (or the chain looped)."""

    after_minutes: int = Field(ge=0, le=24 * 60)
    notify: list[Recipient] = Field(min_length=1)


class Escalation(_Model):
    """A chain of steps, looped ``repeat`` more times while nobody acknowledges; an ack not resolved re-triggers."""

    id: Ident
    steps: list[Step] = Field(min_length=1)
    repeat: int = Field(default=1, ge=0, le=20, description="loops of the whole chain after the first pass")
    loop_after_minutes: int = Field(default=15, ge=1, le=24 * 60, description="pause after the last step")
    ack_timeout_minutes: int | None = Field(
        default=60, ge=1, le=7 * 24 * 60, description="acknowledged but not resolved by then: the chain starts again"
    )

    @model_validator(mode="after")
    def _ordered(self) -> Escalation:
        times = [s.after_minutes for s in self.steps]
        if times != sorted(times):
            raise ValueError(f"escalation {self.id!r}: steps must be in after_minutes order")
        return self


class RuleSettings(_Model):
    """A rule's site settings; anything left out keeps the rule's default (controller/alerts/rules.py)."""

    enabled: bool = True
    severity: Severity | None = None
    escalation: Ident | None = None
    threshold: int | None = Field(default=None, ge=1, le=100_000, description="count or limit, per the rule")
    window_minutes: int | None = Field(default=None, ge=1, le=7 * 24 * 60)
    debounce_s: int | None = Field(
        default=None, ge=0, le=86_400, description="a cleared alert firing again within this is the same alert"
    )


class AlertSettings(_Model):
    """The policy's ``alerts`` section."""

    contacts: list[Contact] = Field(default_factory=list)
    rosters: list[Roster] = Field(default_factory=list)
    escalations: list[Escalation] = Field(default_factory=list)
    default_escalation: Ident | None = Field(default=None, description="for rules that name none")
    rules: dict[RuleId, RuleSettings] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _references(self) -> AlertSettings:
        contacts = {c.id for c in self.contacts}
        if len(contacts) != len(self.contacts):
            raise ValueError("alerts: duplicate contact id")
        rosters = {r.id for r in self.rosters}
        if len(rosters) != len(self.rosters):
            raise ValueError("alerts: duplicate roster id")
        chains = {e.id for e in self.escalations}
        if len(chains) != len(self.escalations):
            raise ValueError("alerts: duplicate escalation id")
        for roster in self.rosters:
            for who in [*roster.business, *roster.after_hours, *(roster.holiday or [])]:
                if who not in contacts:
                    raise ValueError(f"alerts: roster {roster.id!r} names unknown contact {who!r}")
        for chain in self.escalations:
            for step in chain.steps:
                for who in step.notify:
                    if who.startswith("roster:"):
                        if who.removeprefix("roster:") not in rosters:
                            raise ValueError(f"alerts: escalation {chain.id!r} names unknown roster {who!r}")
                    elif who not in contacts:
                        raise ValueError(f"alerts: escalation {chain.id!r} names unknown contact {who!r}")
        unknown = sorted(set(self.rules) - set(RULE_IDS))
        if unknown:
            raise ValueError(f"alerts: unknown rule {unknown[0]!r} (known: {', '.join(RULE_IDS)})")
        named = [self.default_escalation, *(r.escalation for r in self.rules.values())]
        for chain_id in named:
            if chain_id is not None and chain_id not in chains:
                raise ValueError(f"alerts: unknown escalation {chain_id!r}")
        return self
