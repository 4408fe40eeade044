"""The door agent's core (``DoorAgentCore``): policy, readers, keypads, the lock board and commands in;
events and relay commands out. The adapters to the real drivers call the methods below; nothing here
touches a device, a socket or a thread of its own.

Order of work for a card tap: ``card.presented`` and the decision are written to the outbox (``emit``
returns once the event is on disk), and only then is the relay commanded. If recording fails, the
door is not released (no action without its record); the one exception is an emergency release,
which goes ahead even unrecorded because people may be trapped. A relay command that raises becomes
``door.alarm relay_fault`` and is retried on later ticks; it never escapes to the caller. Feedback to
the reader (LED/buzzer) is best effort.

All public methods take one lock: reader, keypad, board and command callbacks arrive on different
threads. The callbacks given to the constructor are called with that lock held, in order, so they must
not block for long, and must not wait for another thread that calls into this core.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, Protocol

from sekisho.agents.doors.access import AccessController
from sekisho.agents.doors.actions import Action, Emit, Feedback, Mode, Opened, Secured, SetRelay, Unlock
from sekisho.agents.doors.cabinet import KeyCabinetTracker
from sekisho.agents.doors.checks import CardEvidence, PolicyState
from sekisho.agents.doors.commands import LOCKDOWN, NO_DOORS, NOT_RECORDED, UNKNOWN_AREA, UNKNOWN_DOOR
from sekisho.agents.doors.debounce import DEFAULT_DEBOUNCE_S
from sekisho.agents.doors.machine import DoorMachine, DoorState, emergency_capable
from sekisho.agents.doors.store import STATE_NAME, DoorStateStore
from sekisho.agents.runtime.errors import OutboxFull
from sekisho.protocol import door_commands, messages, timefmt
from sekisho.protocol.door_commands import Selection, parse_forgive, parse_selection, parse_unlock
from sekisho.protocol.errors import Rejected
from sekisho.protocol.policy import Door, SitePolicy

log = logging.getLogger(__name__)

PolicyProvider = Callable[[], tuple[SitePolicy | None, PolicyState, datetime | None]]
EmitFn = Callable[[str, dict[str, Any]], int]
SetRelayFn = Callable[[int, bool, int | None], None]
FeedbackFn = Callable[[str, bool], None]
InputKind = Literal["door", "key_slot", "tamper"]
Handler = Callable[[messages.VerifiedCommand], str | None]


class Clock(Protocol):
    """Wall time (aware) for records and schedules, monotonic seconds for timers."""

    def now(self) -> datetime:
        """Return the current time, timezone-aware."""
        ...

    def monotonic(self) -> float:
        """Return monotonic seconds."""
        ...


class SystemClock:
    """The real clocks."""

    def now(self) -> datetime:
        """Return the current time in UTC."""
        return timefmt.now()

    def monotonic(self) -> float:
        """Return time.monotonic()."""
        return time.monotonic()


class CommandRegistry(Protocol):
    """What ``register_commands`` needs of ``agents.runtime.commands.CommandDispatcher``."""

    def register(self, name: str, handler: Handler) -> None:
        """Add the handler for a command name."""
        ...


_DECISIONS = {"door.access_granted": "granted", "door.access_denied": "denied"}


def _log_decision(action: Emit, *, recorded: bool) -> None:
    """Log a grant or deny: door, reader, person id and the reason or rule; never the card or a PIN."""
    decision = _DECISIONS.get(action.type)
    if decision is None:
        return
    p = action.payload
    fields = {
        "decision": decision,
        "door": p.get("door"),
        "reader": p.get("reader"),
        "person": p.get("person"),
        "reason": p.get("reason") if decision == "denied" else p.get("rule"),
        "recorded": recorded,
    }
    # The payload's card_masked/card_hash and detail stay out: the event keeps them, the log does not need them.
    log.info(
        "door %s: access %s for %s at reader %s (%s)%s",
        fields["door"],
        decision,
        fields["person"] or "unknown card",
        fields["reader"] or "-",
        fields["reason"] or "-",
        "" if recorded else " — NOT RECORDED",
        extra={"fields": fields},
    )


class DoorAgentCore:
    """Runs the doors of one agent: card decisions, door machines, key cabinets, commands."""

    def __init__(
        self,
        *,
        policy: PolicyProvider,
        emit: EmitFn,
        set_relay: SetRelayFn,
        feedback: FeedbackFn,
        state_dir: Path,
        clock: Clock | None = None,
        debounce_s: float = DEFAULT_DEBOUNCE_S,
    ) -> None:
        self._provider = policy
        self._emit = emit
        self._set_relay = set_relay
        self._feedback = feedback
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._debounce_s = debounce_s
        self._lock = threading.RLock()
        self._store = DoorStateStore(state_dir / STATE_NAME)
        self._access = AccessController(self._store)
        self._cabinets = KeyCabinetTracker(self._store, debounce_s=debounce_s)
        self._machines: dict[str, DoorMachine] = {}
        # What the readers last said, kept for doors that a later policy gives them to.
        self._reader_health: dict[str, tuple[bool, str | None]] = {}
        self._reader_floods: dict[str, tuple[int, float]] = {}
        self._policy: SitePolicy | None = None
        self._state: PolicyState = "none"
        self._synced = False

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Load the policy and take control of every relay (locked, or an emergency release re-applied)."""
        with self._lock:
            self._sync_policy()

    def close(self) -> None:
        """Close the state store."""
        with self._lock:
            self._store.close()

    def policy_changed(self) -> None:
        """Re-read the policy (call from the policy cache's listener); doors and pending taps follow it."""
        with self._lock:
            self._advance()
            self._sync_policy()

    # --- inputs from the adapters -------------------------------------------------------------

    def card_presented(self, reader_id: str, evidence: CardEvidence) -> None:
        """Decide a card tap at a reader and act on it."""
        with self._lock:
            self._advance()
            self._sync_policy()
            actions = self._access.card_presented(
                policy=self._policy,
                policy_state=self._state,
                reader_id=reader_id,
                evidence=evidence,
                now=self._clock.now(),
                mono=self._clock.monotonic(),
                mode_of=self._mode_of,
            )
            self._run(actions)

    def keys_entered(self, reader_id: str, keys: str) -> None:
        """Take keypad input at a reader (digits, ``*`` clears, ``#`` submits)."""
        with self._lock:
            self._advance()
            self._sync_policy()
            actions = self._access.keys_entered(
                policy=self._policy,
                policy_state=self._state,
                reader_id=reader_id,
                keys=keys,
                now=self._clock.now(),
                mono=self._clock.monotonic(),
                mode_of=self._mode_of,
            )
            self._run(actions)

    def input_changed(self, kind: InputKind, index: int, active: bool) -> None:
        """Take a board input: ``door`` (active: open), ``key_slot`` (active: key present), ``tamper``."""
        with self._lock:
            self._advance()
            mono = self._clock.monotonic()
            if kind == "door":
                machines = [m for m in self._machines.values() if m.door.sensor == index]
                if not machines:
                    log.debug("door sensor input %d belongs to no door", index)
                for machine in machines:
                    self._run(machine.sensor(mono, active))
            elif kind == "key_slot":
                self._run(self._cabinets.slot_changed(index, active, mono, self._clock.now()))
            elif kind == "tamper":
                # The board's enclosure switch guards every lock it drives.
                for machine in self._machines.values():
                    self._run(machine.tamper(mono, active, source=f"input {index}"))
            else:
                log.warning("unknown input kind %r (index %d) ignored", kind, index)

    def reader_status(self, reader_id: str, online: bool, sc_failure: str | None = None) -> None:
        """Raise or clear ``reader_offline``, or ``reader_sc_failed`` with its cause, for the reader's door.

        Call it with a reader's settled state only: a link that has not yet had its chance to bring a reader
        up has no verdict, and no alarm should follow from it.
        """
        with self._lock:
            self._advance()
            self._reader_health[reader_id] = (online, sc_failure)
            machine = self._machine_of_reader(reader_id)
            if machine is not None:
                self._run(machine.reader_status(self._clock.monotonic(), reader_id, online, sc_failure))

    def reader_flood(self, reader_id: str, flooding: bool, dropped: int = 0, reads_per_s: float = 0.0) -> None:
        """Raise ``reader_flood`` for the reader's door, or clear it once the reader has calmed down."""
        with self._lock:
            self._advance()
            if flooding:
                self._reader_floods[reader_id] = (dropped, reads_per_s)
            else:
                self._reader_floods.pop(reader_id, None)
            machine = self._machine_of_reader(reader_id)
            if machine is not None:
                mono = self._clock.monotonic()
                self._run(machine.reader_flood(mono, reader_id, flooding, dropped, reads_per_s))

    def reader_tamper(self, reader_id: str, active: bool) -> None:
        """Raise or clear a tamper alarm reported by a reader (e.g. OSDP tamper status)."""
        with self._lock:
            self._advance()
            machine = self._machine_of_reader(reader_id)
            if machine is not None:
                mono = self._clock.monotonic()
                self._run(machine.tamper(mono, active, source=f"reader {reader_id}", reader=reader_id))

    def board_rebooted(self) -> None:
        """Re-apply every door's intended relay state after the lock board restarted."""
        with self._lock:
            self._advance()
            mono = self._clock.monotonic()
            for machine in self._machines.values():
                self._run(machine.board_rebooted(mono))

    def board_online(self, online: bool) -> None:
        """Raise ``board_offline`` on every door, or clear it and re-apply the relays."""
        with self._lock:
            self._advance()
            mono = self._clock.monotonic()
            for machine in self._machines.values():
                self._run(machine.board_status(mono, online))

    def relay_fault(self, index: int, commanded: bool, sensed: bool) -> None:
        """Take the board's relay read-back: a mismatch raises ``relay_fault``, a match clears it."""
        with self._lock:
            self._advance()
            mono = self._clock.monotonic()
            for machine in [m for m in self._machines.values() if m.door.relay == index]:
                self._run(machine.relay_report(mono, commanded, sensed))

    def tick(self) -> None:
        """Process every timer that is due (call every ~50 ms, or sleep until ``next_deadline()``)."""
        with self._lock:
            self._advance()

    def next_deadline(self) -> float | None:
        """Return the monotonic time of the next timer, or None if nothing is timed."""
        with self._lock:
            deadlines = [m.next_deadline() for m in self._machines.values()]
            deadlines += [self._access.next_deadline(), self._cabinets.next_deadline()]
            known = [d for d in deadlines if d is not None]
            return min(known) if known else None

    # --- status -------------------------------------------------------------------------------

    def door_states(self) -> dict[str, tuple[DoorState, Mode]]:
        """Return each door's state and mode."""
        with self._lock:
            return {door_id: (m.state, m.mode) for door_id, m in self._machines.items()}

    def alarms(self, door_id: str) -> frozenset[str]:
        """Return the alarms raised at a door."""
        with self._lock:
            machine = self._machines.get(door_id)
            return machine.alarms if machine is not None else frozenset()

    # --- commands -----------------------------------------------------------------------------

    def register_commands(self, dispatcher: CommandRegistry) -> None:
        """Register door.unlock, door.emergency_unlock, door.lockdown, door.normal, door.forgive_passback."""

        def unlock(command: messages.VerifiedCommand) -> str:
            args = parse_unlock(command.command.args)
            return self.unlock(args.door, args.seconds, command_id=command.command.id, requested_by=args.requested_by)

        def mode(name: Mode) -> Handler:
            def handler(command: messages.VerifiedCommand) -> str:
                return self.set_mode(name, parse_selection(command.command.args), command_id=command.command.id)

            return handler

        def forgive(command: messages.VerifiedCommand) -> str:
            args = parse_forgive(command.command.args)
            return self.forgive_passback(args.area, args.person, command_id=command.command.id)

        dispatcher.register(door_commands.UNLOCK, unlock)
        for name, door_mode in door_commands.MODE_OF.items():
            dispatcher.register(name, mode(door_mode))
        dispatcher.register(door_commands.FORGIVE_PASSBACK, forgive)

    def unlock(
        self, door_id: str, seconds: int | None = None, *, command_id: str | None, requested_by: str | None = None
    ) -> str:
        """Release one door for ``seconds`` (default: its ``unlock_s``) on a signed command."""
        with self._lock:
            self._advance()
            self._sync_policy()
            machine = self._machines.get(door_id)
            if machine is None:
                raise Rejected(UNKNOWN_DOOR, f"door {door_id!r} is not a door of this agent")
            if machine.mode == "lockdown":
                raise Rejected(LOCKDOWN, f"door {door_id} is in lock-down; send door.normal first")
            if machine.mode == "emergency_unlock":
                return f"door {door_id} already released (emergency unlock)"
            seconds = seconds if seconds is not None else machine.door.unlock_s
            mono = self._clock.monotonic()
            if not self._run(machine.remote_unlock(mono, seconds, command_id=command_id, requested_by=requested_by)):
                raise Rejected(NOT_RECORDED, f"door {door_id} stays locked: the unlock could not be recorded")
            return f"door {door_id} unlocked for {seconds} s"

    def set_mode(self, mode: Mode, selection: Selection, *, command_id: str | None) -> str:
        """Put the selected doors in a mode; emergency unlock skips lockers and key cabinets."""
        with self._lock:
            self._advance()
            self._sync_policy()
            doors = self._select(selection)
            skipped = [m.id for m in doors if mode == "emergency_unlock" and not emergency_capable(m.door)]
            changed = unchanged = 0
            mono = self._clock.monotonic()
            for machine in doors:
                if machine.id in skipped:
                    continue
                if machine.mode == mode:
                    unchanged += 1
                    continue
                # Remembered before acting: an agent restart mid-emergency must not re-lock fire exits.
                self._store.set_mode(machine.id, mode, command_id)
                if mode == "lockdown":
                    self._run(self._access.end_door(machine.id, "lockdown"))
                self._run(machine.set_mode(mono, mode, command_id=command_id, group=selection.group))
                changed += 1
            result = f"{mode}: {changed} door(s) changed, {unchanged} already"
            if skipped:
                result += f"; storage stays secure: {', '.join(skipped)}"
            return result[:200]

    def forgive_passback(self, area: str, person: str | None = None, *, command_id: str | None) -> str:
        """Forget who is inside an anti-passback area (everyone, or one person)."""
        with self._lock:
            self._advance()
            self._sync_policy()
            if area not in self._access.passback_areas():
                raise Rejected(UNKNOWN_AREA, f"no anti-passback door of this agent keeps area {area!r}")
            actions, forgotten = self._access.forgive(area, person, command_id=command_id)
            self._run(actions)
            return f"passback forgiven in {area}: {len(forgotten)} person(s)"

    def mode(self, door_id: str) -> Mode:
        """Return a door's mode (normal for an unknown door)."""
        with self._lock:
            return self._mode_of(door_id)

    # --- internals ----------------------------------------------------------------------------

    def _mode_of(self, door_id: str) -> Mode:
        machine = self._machines.get(door_id)
        return machine.mode if machine is not None else "normal"

    def _select(self, selection: Selection) -> list[DoorMachine]:
        if not self._machines:
            raise Rejected(NO_DOORS, "this agent has no doors in its policy")
        if selection.all:
            return list(self._machines.values())
        if selection.area is not None:
            chosen = [m for m in self._machines.values() if m.door.area == selection.area]
            if not chosen:
                raise Rejected(UNKNOWN_AREA, f"no door of this agent is in area {selection.area!r}")
            return chosen
        unknown = [d for d in selection.doors if d not in self._machines]
        if unknown:
            raise Rejected(UNKNOWN_DOOR, f"not doors of this agent: {', '.join(unknown)}"[:300])
        return [self._machines[d] for d in selection.doors]

    def _machine_of_reader(self, reader_id: str) -> DoorMachine | None:
        for machine in self._machines.values():
            if any(r.id == reader_id for r in machine.door.readers):
                return machine
        log.debug("reader %s belongs to no door", reader_id)
        return None

    def _sync_policy(self) -> None:
        policy, state, _expired_at = self._provider()
        if self._synced and policy is self._policy and state == self._state:
            return
        self._synced = True
        self._policy, self._state = policy, state
        now, mono = self._clock.now(), self._clock.monotonic()
        if policy is not None:
            # Machines follow the last policy held, even expired: lock timing and alarms carry on
            # without one, only card decisions fail closed.
            self._reconcile_doors(policy.doors, mono)
            self._cabinets.update_policy(policy)
        self._run(self._access.update_policy(policy, state, now, mono, mode_of=self._mode_of))

    def _reconcile_doors(self, doors: Iterable[Door], mono: float) -> None:
        wanted = {d.id: d for d in doors}
        for door_id in [d for d in self._machines if d not in wanted]:
            machine = self._machines.pop(door_id)
            self._run(self._access.end_door(door_id, "unknown_reader", "door removed from the policy"))
            self._run(machine.retire(mono))
            self._store.set_mode(door_id, "normal", None)
        stored = self._store.modes()
        for door_id, door in wanted.items():
            existing = self._machines.get(door_id)
            if existing is not None:
                self._run(existing.update_door(mono, door))
                self._run(self._reader_alarms(existing, mono))  # a reader new to this door
                continue
            saved = stored.get(door_id)
            machine = DoorMachine(
                door,
                debounce_s=self._debounce_s,
                mode=saved.mode if saved is not None else "normal",
                mode_command=saved.command_id if saved is not None else None,
            )
            if saved is not None and machine.mode != saved.mode:
                self._store.set_mode(door_id, machine.mode, None)
            self._machines[door_id] = machine
            self._run(machine.restart(mono))
            self._run(self._reader_alarms(machine, mono))
        for door_id in [d for d in stored if d not in wanted]:
            self._store.set_mode(door_id, "normal", None)  # a mode of a door the policy no longer has

    def _reader_alarms(self, machine: DoorMachine, mono: float) -> list[Action]:
        """Raise what a door's readers said before they were its readers (alarms already raised stay as they are)."""
        out: list[Action] = []
        for reader in machine.door.readers:
            if (health := self._reader_health.get(reader.id)) is not None:
                out.extend(machine.reader_status(mono, reader.id, *health))
            if (flood := self._reader_floods.get(reader.id)) is not None:
                out.extend(machine.reader_flood(mono, reader.id, True, *flood))
        return out

    def _advance(self) -> None:
        mono, now = self._clock.monotonic(), self._clock.now()
        for machine in list(self._machines.values()):
            self._run(machine.tick(mono))
        self._run(self._access.tick(now, mono))
        self._run(self._cabinets.tick(mono, now))

    def _run(self, actions: Iterable[Action]) -> bool:
        """Carry out actions in order; after a failed record, nothing it would justify is done.

        Reader feedback (LED, buzzer) is given last, after the relays: the door opens without waiting for the
        reader's LED command to be queued, and a refusal has no relay to wait for anyway.
        """
        failed = False
        queue: deque[Action] = deque(actions)
        feedback: list[tuple[str, bool]] = []
        while queue:
            action = queue.popleft()
            if isinstance(action, Emit):
                failed = not self._record(action) or failed
            elif isinstance(action, SetRelay):
                if action.on and failed and action.max_on_ms is not None:
                    log.error("relay %d not released: the event justifying it was not recorded", action.relay)
                    continue
                queue.extendleft(reversed(self._drive(action)))
            elif isinstance(action, Feedback):
                feedback.append((action.reader, action.ok and not failed))
            elif isinstance(action, Unlock):
                if failed:
                    log.error("door %s not unlocked: its grant was not recorded", action.door)
                    continue
                queue.extendleft(reversed(self._unlock(action)))
            elif isinstance(action, Opened):
                self._opened(action)
            elif isinstance(action, Secured):
                self._cabinets.session_ended(action.door, action.at)
        for reader, ok in feedback:
            self._give_feedback(reader, ok)
        return not failed

    def _record(self, action: Emit) -> bool:
        try:
            self._emit(action.type, action.payload)
        except OutboxFull:
            # The agent logged the full disk once and its heartbeat says outbox_full; an ERROR per tap would
            # replace that code with this module's and repeat the same news on every card.
            log.warning("cannot record %s: the outbox's disk is full", action.type)
            _log_decision(action, recorded=False)
            return False
        except Exception as err:  # a full disk or a bad field must not crash the door; it is logged
            log.error("cannot record %s: %s", action.type, err)
            _log_decision(action, recorded=False)
            return False
        _log_decision(action, recorded=True)
        return True

    def _drive(self, action: SetRelay) -> list[Action]:
        mono = self._clock.monotonic()
        machine = next((m for m in self._machines.values() if m.door.relay == action.relay), None)
        try:
            self._set_relay(action.relay, action.on, action.max_on_ms)
        except Exception as err:  # any driver failure becomes an alarm, never an exception upward
            state = "on" if action.on else "off"
            log.error("relay %d %s failed: %s", action.relay, state, err)
            if machine is None:
                return []
            return machine.relay_failed(mono, f"relay {action.relay} {state}: {type(err).__name__}: {err}")
        return machine.relay_succeeded(mono) if machine is not None else []

    def _give_feedback(self, reader: str, ok: bool) -> None:
        try:
            self._feedback(reader, ok)
        except Exception as err:  # LEDs and buzzers are a courtesy; the decision stands without them
            log.warning("feedback to reader %s failed: %s", reader, err)

    def _unlock(self, action: Unlock) -> list[Action]:
        machine = self._machines.get(action.door)
        if machine is None:
            return []
        mono = self._clock.monotonic()
        out = machine.grant(mono, action.passages)
        persons = tuple(p.person for p in action.passages)
        if self._cabinets.is_cabinet(action.door) and machine.mode == "normal":
            self._cabinets.session_started(action.door, persons, mono)
        if machine.door.sensor is None and machine.mode == "normal":
            # Without a door sensor the grant is the only evidence of a passage.
            self._access.record_passages(machine.door, action.passages, self._clock.now())
        return out

    def _opened(self, action: Opened) -> None:
        machine = self._machines.get(action.door)
        if machine is not None and not action.forced and action.passages:
            self._access.record_passages(machine.door, action.passages, self._clock.now())
