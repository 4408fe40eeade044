"""The USB guard: judge every device against registered media, loans and rules; write the decision to sysfs.

Order of judgement for one device:

1. No valid policy (``in_force()`` is None: none yet, expired, or unparseable) → fail closed: only the
   product default applies (hubs and HID keyboards/mice allowed, everything else blocked); admin rules
   and loans are ignored until a valid bundle arrives.
2. Class checks no rule or loan can override: no interfaces → block; storage + HID → reject (BadUSB).
3. Registered medium (the serial's SHA-256 matches a ``Medium``; a pinned ``device_hash`` must match
   too, or the device is blocked as ``medium_hash_mismatch`` — a cloned serial is an incident, not an
   unregistered stick): allowed only with a loan that is active now, names this terminal and is held
   by the person logged in; otherwise blocked with a precise reason code.
4. Anything else → the rule set (the admin's rules from the agent's rules file first, then the
   product default; first match wins, default block) — except that on a My Number terminal (every
   terminal this guard runs on) the media register outranks admin allow rules for mass storage: a
   device with a mass-storage interface (class 08) that step 3 did not allow is blocked
   (``not_registered``) even when an admin rule allows it. ``sekisho usb import-rules`` refuses such
   rules up front (or, with ``--allow-mass-storage-outside-register``, imports them knowing this).

Precedence, highest first: no valid policy → product default only; class checks (BadUSB, no
interfaces); the media register and its loans; for mass storage, "not in the register → block";
admin rules; product default.

Decisions are recorded before they are carried out: the event is on the outbox's disk before
``authorized`` is written. An allow whose event cannot be recorded is not carried out.

``reject`` differs from ``block``: both deauthorise and record the reason, but a rejected device (and
one caught writing to a read-only loan) is never re-judged on a policy or session change — it stays
out until it is unplugged and plugged again. (USBGuard also removes a rejected device from the bus
via its ``remove`` attribute; we only deauthorise.)

Re-judging: every policy change, session change and clock sweep (``sweep()``, which also catches a
loan's ``ends_at`` passing and checks read-only media for writes) re-judges the devices present and
acts only where the outcome changed.

Read-only and read-write loans with the udev rule (``deploy/udev/``, see ``drivers/usb/blockdev.py``):
the rule makes every block device behind a USB device read-only as udev creates it, unless the guard
granted that plug writes. So for a read-write loan the guard writes the grant *before* ``authorized``
(the block device cannot exist before), and lifts read-only (``BLKROSET`` 0) on any block device of the
medium that is read-only all the same (agent restarted, loan changed from read-only); for everything
else — read-only loans, blocks, removals, a loan turning read-only — it withdraws the grant first. A
grant that cannot be written leaves the medium read-only until the guard lifts it: the safe side.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, Literal, Protocol

from pydantic import ValidationError

from sekisho.agents.usb.rules import (
    RuleSet,
    Target,
    decide_device,
    default_ruleset,
    may_allow_mass_storage,
    parse_rules,
)
from sekisho.agents.usb.rules.policy import MASS_STORAGE_CLASS
from sekisho.agents.usb.session import SessionProvider
from sekisho.drivers.usb.blockdev import BlockDevice, BlockDeviceControl
from sekisho.drivers.usb.errors import UsbAccessError, UsbDescriptorError, UsbDeviceGone, UsbError
from sekisho.drivers.usb.events import HotplugSource, UsbEvent
from sekisho.drivers.usb.model import UsbDevice
from sekisho.drivers.usb.sysfs import SysfsUsb
from sekisho.protocol import timefmt
from sekisho.protocol.messages import VerifiedBundle
from sekisho.protocol.policy import MediaLoan, Medium, SitePolicy

# The agent's emit_many: records several events in one transaction (one fsync) and returns their seqs.
EmitMany = Callable[[list[tuple[str, dict[str, Any]]]], list[int]]
Trigger = Literal["insert", "start", "policy", "session", "clock", "write_watch", "block_device"]
State = Literal["allowed", "blocked", "rejected", "unreadable"]

MEDIA_RULE = "media-loan"
NO_POLICY_PREFIX = "no valid policy (fail closed)"
_MAX_TEXT = 200

_LOG = logging.getLogger(__name__)


class PolicySource(Protocol):
    """What the guard needs of the agent's PolicyCache."""

    def in_force(self) -> VerifiedBundle | None:
        """Return the valid bundle, or None."""
        ...

    def subscribe(self, listener: Callable[[Any], None]) -> Callable[[], None]:
        """Call ``listener`` on every policy change; return an unsubscribe function."""
        ...


class MediaReason(StrEnum):
    """Why a registered medium was blocked (the ``reason`` of its ``usb.blocked`` event)."""

    NO_ACTIVE_LOAN = "no_active_loan"
    LOAN_EXPIRED = "loan_expired"
    LOAN_NOT_STARTED = "loan_not_started"
    LOAN_RETURNED = "loan_returned"
    WRONG_PERSON = "wrong_person"
    NO_SESSION = "no_session"
    WRONG_TERMINAL = "wrong_terminal"
    MEDIUM_NOT_ACTIVE = "medium_not_active"
    MEDIUM_HASH_MISMATCH = "medium_hash_mismatch"
    MEDIUM_NOT_STORAGE = "medium_not_storage"
    READONLY_FAILED = "readonly_failed"
    WRITE_DETECTED = "write_detected"
    NOT_REGISTERED = "not_registered"


@dataclass(frozen=True, slots=True)
class Verdict:
    """The outcome for one device: target, the rule (or ``media-loan``), the reason, the loan context."""

    target: Target
    rule: str
    reason: str
    medium: str | None = None
    loan: str | None = None
    person: str | None = None
    read_only: bool = False


@dataclass(slots=True)
class _Tracked:
    """A device the guard has judged and not yet seen removed."""

    sys_name: str
    device: UsbDevice | None
    verdict: Verdict | None
    state: State
    sticky: bool = False
    # Read-only block devices: name → sectors written when read-only was applied.
    protected: dict[str, int] = field(default_factory=dict)
    # A read-write loan's grant to the udev rule is in place; block devices that stay read-only anyway.
    writable: bool = False
    write_protected: set[str] = field(default_factory=set)


@dataclass(frozen=True, slots=True)
class _PolicyView:
    """The parts of a bundle the guard reads, indexed once per bundle."""

    media_by_serial: dict[str, Medium]
    loans_by_medium: dict[str, list[MediaLoan]]


def serial_sha256(serial: str) -> str:
    """Return the SHA-256 hex of a USB serial string (UTF-8), as the media register stores it."""
    return hashlib.sha256(serial.encode("utf-8")).hexdigest()


def site_ruleset(admin_rules_text: str | None = None) -> RuleSet:
    """Return the admin's rules (if any) followed by the product default; raise ValueError on a bad rule."""
    default = default_ruleset()
    if not admin_rules_text:
        return default
    parsed = parse_rules(admin_rules_text, default_target=Target.BLOCK)
    if parsed.problems:
        raise ValueError("; ".join(str(p) for p in parsed.problems))
    admin = parsed.ruleset
    lines = admin.source_lines if len(admin.source_lines) == len(admin.rules) else ()
    for rule, line in zip(admin.rules, lines, strict=False):
        if may_allow_mass_storage(rule):
            _LOG.warning(
                "admin USB rule on line %d can allow mass storage; the media register outranks it: %s", line, rule
            )
    return RuleSet(
        rules=admin.rules + default.rules,
        default_target=Target.BLOCK,
        source_lines=lines,
    )


_PASS_ALL = RuleSet(default_target=Target.ALLOW)


class UsbGuard:
    """Decides every USB device on one terminal and keeps the decisions current as policy and session change."""

    def __init__(
        self,
        agent_emit_many: EmitMany,
        policy_source: PolicySource,
        sysfs: SysfsUsb,
        hotplug: HotplugSource,
        session: SessionProvider,
        terminal_id: str,
        blockdevs: BlockDeviceControl,
        *,
        rules: RuleSet | None = None,
        now: Callable[[], datetime] = timefmt.now,
    ) -> None:
        self._emit_many = agent_emit_many
        self._policy = policy_source
        self._sysfs = sysfs
        self._hotplug = hotplug
        self._session = session
        self._terminal = terminal_id
        self._blockdevs = blockdevs
        self._rules = rules if rules is not None else default_ruleset()
        self._now = now
        # Hot-plug, policy and session callbacks come from different threads; one decision at a time.
        self._lock = threading.RLock()
        self._known: dict[str, _Tracked] = {}
        self._unsubscribe: list[Callable[[], None]] = []
        self._view_bundle: VerifiedBundle | None = None
        self._view: _PolicyView | None = None
        self._started = False

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Distrust new devices on every root hub, subscribe, then judge every device already present."""
        with self._lock:
            if self._started:
                return
            self._started = True
            try:
                self._sysfs.set_authorized_default(0)
            except UsbError as err:
                # Not fatal: each add is still judged and deauthorised; the window is only wider.
                _LOG.error("cannot set authorized_default=0 on root hubs: %s", err)
            try:
                # Grants from a previous run name plugs nobody has judged yet.
                self._blockdevs.revoke_all_writes()
            except (UsbError, OSError) as err:
                _LOG.error("cannot clear read-write grants: %s", err)
            self._unsubscribe = [
                self._policy.subscribe(self._on_policy_change),
                self._session.subscribe(self._on_session_change),
                self._hotplug.subscribe(self._on_hotplug),
            ]
            self._hotplug.start()
            try:
                scan = self._sysfs.scan()
            except UsbDescriptorError as err:
                _LOG.error("cannot list USB devices at start: %s", err)
                return
            # Devices present at start were authorised by the kernel default: none of them is trusted.
            for device in scan.devices:
                if not device.is_root_hub:
                    self._admit(device, "start")
            for error in scan.unreadable:
                if error.sys_name is not None:
                    self._admit_unreadable(error.sys_name, error, "start")

    def stop(self) -> None:
        """Unsubscribe and stop the hot-plug source; idempotent."""
        with self._lock:
            unsubscribe, self._unsubscribe = self._unsubscribe, []
            self._started = False
        for call in unsubscribe:
            call()
        self._hotplug.stop()

    # --- inputs -------------------------------------------------------------------------------

    def _on_hotplug(self, event: UsbEvent) -> None:
        with self._lock:
            if event.action == "remove":
                self._removed(event.sys_name)
            elif event.device is not None:
                if not event.device.is_root_hub:
                    self._admit(event.device, "insert")
            else:
                self._admit_unreadable(event.sys_name, event.error, "insert")

    def _on_policy_change(self, change: object) -> None:
        self.reevaluate("policy")

    def _on_session_change(self, person: str | None) -> None:
        _LOG.info("session changed (%s): re-judging USB devices", "login" if person else "logout")
        self.reevaluate("session")

    def on_block_device(self, usb_sys_name: str, block_name: str) -> None:
        """Handle a block device appearing behind a USB device: set it read-only if its loan says so."""
        with self._lock:
            tracked = self._known.get(usb_sys_name)
            if tracked is None or tracked.state != "allowed" or tracked.verdict is None:
                return
            if tracked.verdict.read_only:
                self._protect(tracked, "block_device")
            elif tracked.verdict.medium is not None:
                self._release(tracked)

    def reevaluate(self, trigger: Trigger) -> None:
        """Re-judge every device present and act where the outcome changed."""
        with self._lock:
            for tracked in list(self._known.values()):
                self._rejudge(tracked, trigger)

    def sweep(self) -> None:
        """Re-judge on the clock (loan windows, policy expiry) and check read-only media for writes."""
        with self._lock:
            self.reevaluate("clock")
            for tracked in list(self._known.values()):
                if tracked.state != "allowed" or tracked.verdict is None:
                    continue
                if tracked.verdict.read_only:
                    if self._protect(tracked, "write_watch"):
                        self._check_writes(tracked)
                elif tracked.verdict.medium is not None:
                    self._release(tracked)

    def decisions(self) -> dict[str, str]:
        """Return each known device's state (``allowed``, ``blocked``, ``rejected``, ``unreadable``)."""
        with self._lock:
            return {name: tracked.state for name, tracked in self._known.items()}

    # --- judging ------------------------------------------------------------------------------

    def judge(self, device: UsbDevice) -> Verdict:
        """Return the verdict for a device under the policy in force and the current session (no action)."""
        view = self._policy_view()
        if view is None:
            decision = decide_device(device, default_ruleset())
            return Verdict(decision.target, decision.rule_text, f"{NO_POLICY_PREFIX}: {decision.reason}")
        check = decide_device(device, _PASS_ALL)
        if check.target is not Target.ALLOW:
            return Verdict(check.target, check.rule_text, check.reason)
        medium = view.media_by_serial.get(serial_sha256(device.serial)) if device.serial else None
        if medium is not None:
            return self._judge_medium(device, medium, view)
        decision = decide_device(device, self._rules)
        if decision.allowed and any(interface.cls == MASS_STORAGE_CLASS for interface in device.interfaces):
            # The media register outranks admin allow rules: storage outside it stays out.
            reason = f"{MediaReason.NOT_REGISTERED.value}: mass storage outside the media register ({decision.reason})"
            return Verdict(Target.BLOCK, decision.rule_text, reason)
        return Verdict(decision.target, decision.rule_text, decision.reason)

    def _judge_medium(self, device: UsbDevice, medium: Medium, view: _PolicyView) -> Verdict:
        def blocked(reason: MediaReason, loan: MediaLoan | None = None, person: str | None = None) -> Verdict:
            return Verdict(Target.BLOCK, MEDIA_RULE, reason.value, medium.id, loan.id if loan else None, person)

        if medium.device_hash is not None and medium.device_hash != device.device_hash:
            return blocked(MediaReason.MEDIUM_HASH_MISMATCH)
        if medium.status != "active":
            return blocked(MediaReason.MEDIUM_NOT_ACTIVE)
        if any(interface.cls != MASS_STORAGE_CLASS for interface in device.interfaces):
            # A lent medium is storage and nothing else: a "stick" that also offers a network or
            # vendor interface is not the medium the register describes.
            return blocked(MediaReason.MEDIUM_NOT_STORAGE)
        loans = view.loans_by_medium.get(medium.id, [])
        if not loans:
            return blocked(MediaReason.NO_ACTIVE_LOAN)
        moment = self._now()
        active = [loan for loan in loans if loan.active_at(moment)]
        if not active:
            return blocked(*_inactive_reason(loans, moment))
        here = [loan for loan in active if self._terminal in loan.terminals]
        if not here:
            return blocked(MediaReason.WRONG_TERMINAL, active[0])
        person = self._session.current_person()
        if person is None:
            return blocked(MediaReason.NO_SESSION, here[0])
        held = [loan for loan in here if loan.person == person]
        if not held:
            return blocked(MediaReason.WRONG_PERSON, here[0], person)
        # Two loans of one medium to one person at once: the stricter (read-only) one applies.
        loan = sorted(held, key=lambda item: (not item.read_only, item.id))[0]
        return Verdict(Target.ALLOW, MEDIA_RULE, f"active loan {loan.id}", medium.id, loan.id, person, loan.read_only)

    def _policy_view(self) -> _PolicyView | None:
        bundle = self._policy.in_force()
        if bundle is None:
            return None
        if bundle is self._view_bundle:
            return self._view
        try:
            site = SitePolicy.model_validate(bundle.bundle.policy)
        except ValidationError as err:
            _LOG.error(
                "policy version %d has no usable site policy (%d errors): USB fails closed",
                bundle.bundle.version,
                err.error_count(),
            )
            view = None
        else:
            loans: dict[str, list[MediaLoan]] = {}
            for loan in site.loans:
                loans.setdefault(loan.medium, []).append(loan)
            view = _PolicyView({m.serial_sha256: m for m in site.media}, loans)
        self._view_bundle, self._view = bundle, view
        return view

    # --- acting -------------------------------------------------------------------------------

    def _admit(self, device: UsbDevice, trigger: Trigger) -> None:
        tracked = _Tracked(device.sys_name, device, None, "blocked")
        self._known[device.sys_name] = tracked
        inserted = self._device_fields(device, None, trigger)
        inserted["product"] = device.product[:100] if device.product else None
        inserted["interfaces"] = [i.type_text for i in device.interfaces][:32]
        # "inserted" and the decision go to disk in one transaction: one fsync on the insertion path.
        self._settle(tracked, self.judge(device), trigger, preceding=[("usb.inserted", inserted)])

    def _admit_unreadable(self, sys_name: str, error: UsbError | None, trigger: Trigger) -> None:
        tracked = _Tracked(sys_name, None, None, "unreadable", sticky=True)
        self._known[sys_name] = tracked
        reason = f"unreadable descriptors: {error}" if error is not None else "unreadable descriptors"
        _LOG.warning("USB device %s unreadable, blocked: %s", sys_name, reason)
        self._record(
            "usb.unreadable",
            {"terminal": self._terminal, "sys_name": sys_name, "reason": reason[:_MAX_TEXT], "trigger": trigger},
        )
        self._write(sys_name, authorize=False)

    def _rejudge(self, tracked: _Tracked, trigger: Trigger) -> None:
        if tracked.sticky or tracked.state == "rejected" or tracked.device is None:
            return
        verdict = self.judge(tracked.device)
        old = tracked.verdict
        same = old is not None and (old.target, old.loan, old.read_only, old.person) == (
            verdict.target,
            verdict.loan,
            verdict.read_only,
            verdict.person,
        )
        if same:
            tracked.verdict = verdict  # same outcome: nothing to write, no event
            return
        self._settle(tracked, verdict, trigger)

    def _settle(
        self,
        tracked: _Tracked,
        verdict: Verdict,
        trigger: Trigger,
        preceding: list[tuple[str, dict[str, Any]]] | None = None,
    ) -> None:
        device = tracked.device
        assert device is not None
        fields = self._device_fields(device, verdict, trigger)
        if verdict.target is Target.ALLOW:
            fields["rule"] = verdict.rule[:_MAX_TEXT]
            if verdict.medium is not None:
                fields["read_only"] = verdict.read_only
            if not self._record("usb.allowed", fields, preceding):
                # Design rule: no action without its record. Unrecorded → not authorised.
                verdict = Verdict(Target.BLOCK, verdict.rule, "allow not recorded", verdict.medium, verdict.loan)
                self._write(tracked.sys_name, authorize=False)
                tracked.verdict, tracked.state = verdict, "blocked"
                return
            tracked.verdict, tracked.state = verdict, "allowed"
            _LOG.info("USB %s allowed (%s)", device, verdict.reason)
            read_write = verdict.medium is not None and not verdict.read_only
            # Before `authorized`: the udev rule judges the block devices as they appear, from the grant.
            if read_write:
                tracked.protected.clear()
                self._grant(tracked)
            else:
                self._withdraw(tracked)
            if not self._write(tracked.sys_name, authorize=True):
                tracked.state = "blocked"
                self._withdraw(tracked)
                return
            if verdict.read_only:
                self._protect(tracked, trigger)
            elif read_write:
                self._release(tracked)
            return
        event = "usb.rejected" if verdict.target is Target.REJECT else "usb.blocked"
        fields["reason"] = verdict.reason[:_MAX_TEXT]
        fields["rule"] = verdict.rule[:_MAX_TEXT]
        # A block is carried out even if its record failed: keeping a device out is always safe.
        self._record(event, fields, preceding)
        tracked.verdict = verdict
        tracked.state = "rejected" if verdict.target is Target.REJECT else "blocked"
        tracked.protected.clear()
        _LOG.info("USB %s %s (%s)", device, tracked.state, verdict.reason)
        self._withdraw(tracked)
        self._write(tracked.sys_name, authorize=False)

    def _grant(self, tracked: _Tracked) -> None:
        """Grant the udev rule's helper this plug's writes (a read-write loan)."""
        try:
            self._blockdevs.grant_writes(tracked.sys_name)
        except (UsbError, OSError, ValueError) as err:
            # Not fatal: the rule makes the disk read-only and _release lifts it once it appears.
            _LOG.error("cannot grant writes to %s: %s", tracked.sys_name, err)
            return
        tracked.writable = True

    def _withdraw(self, tracked: _Tracked) -> None:
        """Withdraw the read-write grant, if there is one."""
        if not tracked.writable:
            return
        try:
            self._blockdevs.revoke_writes(tracked.sys_name)
        except (UsbError, OSError, ValueError) as err:
            # The grant names this plug only; the block below deauthorises the device all the same.
            _LOG.error("cannot withdraw the write grant of %s: %s", tracked.sys_name, err)
            return
        tracked.writable = False
        tracked.write_protected.clear()

    def _release(self, tracked: _Tracked) -> None:
        """Lift read-only on a read-write loan's block devices that have it (set by the udev rule or earlier)."""
        try:
            found = self._blockdevs.block_devices(tracked.sys_name)
        except (UsbError, OSError) as err:
            _LOG.warning("cannot list block devices of %s: %s", tracked.sys_name, err)
            return
        for block in found:
            if block.name in tracked.write_protected:
                continue
            try:
                if not self._blockdevs.is_read_only(block):
                    continue
                if not self._blockdevs.set_read_write(block):
                    # The medium's own switch: nothing to lift, and nothing to try again every sweep.
                    tracked.write_protected.add(block.name)
                    continue
            except UsbError as err:
                _LOG.warning("cannot make %s writable: %s", block.name, err)
                continue
            _LOG.info("USB %s: block device %s made writable (read-write loan)", tracked.device, block.name)

    def _protect(self, tracked: _Tracked, trigger: Trigger) -> bool:
        """Set read-only on block devices of an allowed read-only medium not yet protected; False if revoked."""
        try:
            found = self._blockdevs.block_devices(tracked.sys_name)
        except (UsbError, OSError) as err:
            _LOG.warning("cannot list block devices of %s: %s", tracked.sys_name, err)
            return True
        for block in found:
            if block.name in tracked.protected:
                continue
            # Protection first, record after: an fsync before the ioctl would widen the automount race.
            # The usb.allowed event (read_only=true) was recorded before the device was authorised.
            try:
                self._blockdevs.set_read_only(block)
                baseline = self._blockdevs.sectors_written(block)
            except UsbError as err:
                _LOG.error("cannot set %s read-only: %s", block.name, err)
                self._revoke(tracked, MediaReason.READONLY_FAILED, trigger)
                return False
            tracked.protected[block.name] = baseline
            assert tracked.device is not None
            fields = self._device_fields(tracked.device, tracked.verdict, trigger)
            fields["block_device"] = block.name
            self._record("usb.readonly_applied", fields)
            _LOG.info("USB %s: block device %s set read-only", tracked.device, block.name)
        return True

    def _check_writes(self, tracked: _Tracked) -> None:
        for name, baseline in list(tracked.protected.items()):
            block = next((b for b in self._blockdevs.block_devices(tracked.sys_name) if b.name == name), None)
            if block is None:
                continue
            try:
                cleared = not self._blockdevs.is_read_only(block)
                written = self._blockdevs.sectors_written(block) - baseline
            except UsbError as err:
                _LOG.warning("cannot read state of %s: %s", name, err)
                continue
            if cleared or written > 0:
                self._write_detected(tracked, block, "ro_cleared" if cleared else "sectors_written", max(written, 0))
                return

    def _write_detected(self, tracked: _Tracked, block: BlockDevice, how: str, written: int) -> None:
        assert tracked.device is not None
        fields = self._device_fields(tracked.device, tracked.verdict, "write_watch")
        fields.update(block_device=block.name, detected_by=how, sectors_written=written)
        _LOG.warning("USB %s: write to read-only medium detected on %s (%s)", tracked.device, block.name, how)
        self._record("usb.write_attempt", fields)
        self._revoke(tracked, MediaReason.WRITE_DETECTED, "write_watch")

    def _revoke(self, tracked: _Tracked, reason: MediaReason, trigger: Trigger) -> None:
        old = tracked.verdict
        verdict = Verdict(
            Target.BLOCK,
            MEDIA_RULE,
            reason.value,
            old.medium if old else None,
            old.loan if old else None,
            old.person if old else None,
        )
        self._settle(tracked, verdict, trigger)
        # Kept out until it is plugged in again: re-judging would hand it straight back.
        tracked.sticky = True

    def _removed(self, sys_name: str) -> None:
        tracked = self._known.pop(sys_name, None)
        fields: dict[str, Any] = {"terminal": self._terminal, "sys_name": sys_name}
        if tracked is not None:
            self._withdraw(tracked)
            fields["was"] = tracked.state
            if tracked.device is not None:
                fields.update(self._device_fields(tracked.device, tracked.verdict, None))
        self._record("usb.removed", fields)
        _LOG.info("USB device %s removed", sys_name)

    def _device_fields(self, device: UsbDevice, verdict: Verdict | None, trigger: Trigger | None) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "terminal": self._terminal,
            "vendor_product": device.device_id,
            "device_hash": device.device_hash,
            "sys_name": device.sys_name,
        }
        if trigger is not None:
            fields["trigger"] = trigger
        if device.serial:
            fields["serial_masked"] = device.masked_serial
            fields["serial_sha256"] = serial_sha256(device.serial)
        if verdict is not None:
            for key in ("medium", "loan", "person"):
                value = getattr(verdict, key)
                if value is not None:
                    fields[key] = value
        return fields

    def _record(
        self, type_: str, payload: dict[str, Any], preceding: list[tuple[str, dict[str, Any]]] | None = None
    ) -> bool:
        items = [*(preceding or []), (type_, payload)]
        try:
            self._emit_many([(t, {k: v for k, v in p.items() if v is not None}) for t, p in items])
        except Exception as err:  # a full disk or a schema bug must not leave a device half-decided
            _LOG.error("cannot record %s for %s: %s", type_, payload.get("sys_name"), err)
            return False
        return True

    def _write(self, sys_name: str, *, authorize: bool) -> bool:
        try:
            if authorize:
                self._sysfs.authorize(sys_name)
            else:
                self._sysfs.deauthorize(sys_name)
        except UsbDeviceGone:
            _LOG.info("USB device %s gone before its decision was written", sys_name)
            return False
        except (UsbAccessError, ValueError) as err:
            _LOG.error("cannot write decision for %s: %s", sys_name, err)
            return False
        return True


def _inactive_reason(loans: list[MediaLoan], moment: datetime) -> tuple[MediaReason, MediaLoan]:
    """Pick the most telling reason why none of a medium's loans is active (the nearest loan first)."""
    upcoming = sorted(
        (loan for loan in loans if loan.returned_at is None and loan.starts_at > moment),
        key=lambda loan: loan.starts_at,
    )
    if upcoming:
        return MediaReason.LOAN_NOT_STARTED, upcoming[0]
    ended = sorted(
        (loan for loan in loans if loan.returned_at is None and loan.ends_at <= moment),
        key=lambda loan: loan.ends_at,
        reverse=True,
    )
    if ended:
        return MediaReason.LOAN_EXPIRED, ended[0]
    returned = sorted(loans, key=lambda loan: loan.returned_at or loan.ends_at, reverse=True)
    return MediaReason.LOAN_RETURNED, returned[0]
