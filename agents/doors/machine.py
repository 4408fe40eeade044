"""One door's lock and sensor state machine: pure, single-threaded, time passed in by the caller.

States (``DoorMachine.state``)::

    locked ──grant / remote unlock──▶ unlocked ──door opens──▶ open ──door closes──▶ locked
       ▲                                 │
       └──────── window passes unopened ─┘           (emergency_unlock: "released" until normal)

- A grant or a remote unlock energises the relay with ``max_on_ms`` equal to the window, so the board
  re-locks by itself if the agent dies. When the door opens the relay is released at once (the strike
  or magnet latches again when the door shuts); if it does not open within the window the relay is
  released and ``door.locked`` says ``not_opened``.
- An opening is authorised when it *started* (first raw edge of the level that then held for the
  debounce time) while a window was running or the door was in emergency unlock. Anything else is
  ``door.opened forced=true`` plus ``door.alarm forced_open``.
- ``door.alarm held_open`` once the door has been open ``held_open_s`` (not in emergency unlock);
  closing clears it and a forced-open alarm.
- Modes come from signed commands: ``emergency_unlock`` holds the relay on with no board timer (a fire
  exit must stay free even if the agent dies; only room doors take this mode, see docs/doors.md),
  ``lockdown`` releases the relay and the access layer refuses every card, ``normal`` re-locks.
- Device trouble becomes alarms: tamper, reader or board offline, a reader whose Secure Channel failed
  (with its cause), a reader flooding the door with card reads, relay fault (a command that raised, or a
  sensed state that differs from the commanded one). Alarms about a reader name it in ``reader``, raised
  and cleared alike. A board reboot or an agent start re-applies
  the intended relay state; a grant window that was running is ended (``door.locked cause=restart``).

Every method takes the monotonic time ``now`` (seconds) and first processes every timer due up to
then, in time order, so the outcome does not depend on how often ``tick`` is called.
"""

from __future__ import annotations

import logging
from typing import Literal

from sekisho.agents.doors.actions import Action, Emit, Mode, Opened, Passage, Secured, SetRelay, compact
from sekisho.agents.doors.debounce import DEFAULT_DEBOUNCE_S, Debouncer
from sekisho.protocol.policy import Door

log = logging.getLogger(__name__)

# After a relay command raised, the intended state is sent again this often until it goes through.
RELAY_RETRY_S = 1.0
DoorState = Literal["locked", "unlocked", "open", "released"]
# What a reader's failed Secure Channel means, for the alarm's detail (the cause itself is a field).
SC_FAILURE_DETAIL = {
    "key_mismatch": "answers with another key (a swapped reader, or a wrong key file)",
    "plaintext_reader": "offers no Secure Channel (a plaintext reader where a keyed one belongs)",
    "sc_failed": "broke off the Secure Channel handshake",
}


def emergency_capable(door: Door) -> bool:
    """Tell whether emergency unlock releases this door: room doors only; lockers and key cabinets stay secure."""
    return door.kind == "room"


class DoorMachine:
    """The lock relay, the door sensor, the timers and the alarms of one door."""

    def __init__(
        self,
        door: Door,
        *,
        debounce_s: float = DEFAULT_DEBOUNCE_S,
        mode: Mode = "normal",
        mode_command: str | None = None,
    ) -> None:
        self.door = door
        self.mode: Mode = mode if (mode != "emergency_unlock" or emergency_capable(door)) else "normal"
        # The command that put the door in its mode: re-applying an emergency release after a restart
        # cites it, so every relay-on in the record traces back to a grant or a signed command.
        self.mode_command = mode_command
        self._debounce_s = debounce_s
        self._sensor = Debouncer(debounce_s) if door.sensor is not None else None
        self._relay_on = False
        self._until: float | None = None  # end of the grant / remote-unlock window
        self._passages: list[Passage] = []
        # Whether the raw level now settling began while the door was released, and for whom.
        self._raw_authorised = False
        self._raw_passages: tuple[Passage, ...] = ()
        self._relock_deferred = False
        self._open_since: float | None = None
        self._held_from: float | None = None
        self._open_passages: tuple[Passage, ...] = ()
        self._alarms: set[str] = set()
        self._sc_causes: dict[str, str] = {}  # reader -> cause of its raised reader_sc_failed
        self._relay_fault: Literal["command", "sensed"] | None = None
        self._retry_at: float | None = None

    # --- introspection ------------------------------------------------------------------------

    @property
    def id(self) -> str:
        """Return the door id."""
        return self.door.id

    @property
    def state(self) -> DoorState:
        """Return locked, unlocked (window running), open, or released (emergency unlock)."""
        if self.door_open:
            return "open"
        if self.mode == "emergency_unlock":
            return "released"
        return "unlocked" if self._until is not None else "locked"

    @property
    def door_open(self) -> bool:
        """Tell whether the (debounced) sensor says the door is open."""
        return self._sensor is not None and self._sensor.stable is True

    @property
    def relay_on(self) -> bool:
        """Tell whether the relay was last commanded on."""
        return self._relay_on

    @property
    def alarms(self) -> frozenset[str]:
        """Return the alarms currently raised (kind, or kind:qualifier)."""
        return frozenset(self._alarms)

    def released(self, now: float) -> bool:
        """Tell whether an opening starting now would be authorised (window running or emergency unlock)."""
        return self.mode == "emergency_unlock" or (self._until is not None and now < self._until)

    def next_deadline(self) -> float | None:
        """Return the monotonic time of the next timer, or None."""
        due = self._next_due()
        return None if due is None else due[0]

    # --- inputs -------------------------------------------------------------------------------

    def tick(self, now: float) -> list[Action]:
        """Process every timer due by ``now`` (debounce, window, held open, relay retry)."""
        return self._advance(now)

    def grant(self, now: float, passages: tuple[Passage, ...] = ()) -> list[Action]:
        """Release the lock for a recorded grant: relay on for ``unlock_s`` (the board's own timer too)."""
        out = self._advance(now)
        if self.mode == "lockdown":
            log.error("door %s: grant ignored in lockdown", self.id)  # the access layer refuses first
            return out
        if self.mode == "emergency_unlock":
            return out  # already released; nothing to time
        self._passages.extend(passages)
        out.append(self._open_window(now, float(self.door.unlock_s)))
        return out

    def remote_unlock(
        self, now: float, seconds: int, *, command_id: str | None, requested_by: str | None
    ) -> list[Action]:
        """Release the lock for ``seconds`` on a signed command; the event comes before the relay."""
        out = self._advance(now)
        if self.mode != "normal":
            return out
        out.append(
            Emit(
                "door.unlocked",
                compact({"door": self.id, "cause": "command", "command_id": command_id, "requested_by": requested_by}),
            )
        )
        out.append(self._open_window(now, float(seconds)))
        return out

    def set_mode(self, now: float, mode: Mode, *, command_id: str | None, group: str | None = None) -> list[Action]:
        """Enter a mode (emergency unlock is refused for lockers and key cabinets: ValueError)."""
        if mode == "emergency_unlock" and not emergency_capable(self.door):
            raise ValueError(f"door {self.id!r} ({self.door.kind}) is never released by emergency unlock")
        out = self._advance(now)
        previous = self.mode
        if mode == previous:
            return out
        self.mode = mode
        self.mode_command = command_id
        out.append(
            Emit(
                "door.mode_changed",
                compact(
                    {"door": self.id, "mode": mode, "previous": previous, "command_id": command_id, "group": group}
                ),
            )
        )
        self._until = None
        self._passages.clear()
        if mode == "emergency_unlock":
            out.append(
                Emit("door.unlocked", compact({"door": self.id, "cause": "emergency", "command_id": command_id}))
            )
            out.append(self._relay(True, None))
        elif mode == "lockdown":
            out.append(self._relay(False))
            out.append(Emit("door.locked", {"door": self.id, "cause": "lockdown"}))
        else:
            out.append(self._relay(False))
            if previous == "emergency_unlock":
                if self.door_open:
                    self._held_from = now  # the held-open clock starts when the emergency ends
                else:
                    out.append(Emit("door.locked", {"door": self.id, "cause": "normal_mode"}))
        return out

    def sensor(self, now: float, is_open: bool) -> list[Action]:
        """Take a raw door-sensor report (True: open); it counts once it has held for the debounce time."""
        out = self._advance(now)
        if self._sensor is None:
            return out
        if not self._sensor.feed(now, is_open):
            return out
        if self._sensor.pending:
            # Authorisation is judged when the movement starts, not when it has settled.
            self._raw_authorised = self.released(now)
            self._raw_passages = tuple(self._passages)
        elif self._relock_deferred:
            # The opening that began inside the window bounced back shut before it counted.
            self._relock_deferred = False
            out.extend(self._window_ended_unopened(now))
        return out

    def tamper(self, now: float, active: bool, *, source: str, reader: str | None = None) -> list[Action]:
        """Raise or clear a tamper alarm (board enclosure input or reader tamper)."""
        out = self._advance(now)
        key = f"tamper:{source}"
        if active:
            out.extend(self._raise(key, "tamper", f"tamper {source}", reader=reader))
        else:
            out.extend(self._clear(key, "tamper", f"tamper {source} restored", reader=reader))
        return out

    def reader_status(self, now: float, reader: str, online: bool, sc_failure: str | None = None) -> list[Action]:
        """Raise or clear ``reader_offline``, or ``reader_sc_failed`` (it answers, its Secure Channel fails)."""
        out = self._advance(now)
        offline, failed = f"reader_offline:{reader}", f"reader_sc_failed:{reader}"
        if sc_failure is not None:
            out.extend(self._clear(offline, "reader_offline", f"reader {reader} answers again", reader=reader))
            if self._sc_causes.get(reader, sc_failure) != sc_failure:
                out.extend(self._clear(failed, "reader_sc_failed", f"reader {reader}: another cause", reader=reader))
            self._sc_causes[reader] = sc_failure
            detail = f"reader {reader} {SC_FAILURE_DETAIL.get(sc_failure, sc_failure)}"
            out.extend(self._raise(failed, "reader_sc_failed", detail, reader=reader, cause=sc_failure))
        elif not online:
            out.extend(self._clear(failed, "reader_sc_failed", f"reader {reader} stopped answering", reader=reader))
            out.extend(self._raise(offline, "reader_offline", f"reader {reader} offline", reader=reader))
        else:
            out.extend(self._clear(offline, "reader_offline", f"reader {reader} back online", reader=reader))
            out.extend(self._clear(failed, "reader_sc_failed", f"reader {reader} secure again", reader=reader))
        return out

    def reader_flood(self, now: float, reader: str, flooding: bool, dropped: int, reads_per_s: float) -> list[Action]:
        """Raise ``reader_flood`` when a reader sends card reads beyond its limit; clear it when it calms down."""
        out = self._advance(now)
        key = f"reader_flood:{reader}"
        if flooding:
            detail = f"reader {reader} sends card reads faster than {reads_per_s:g}/s; reads beyond it are dropped"
            out.extend(self._raise(key, "reader_flood", detail, reader=reader))
        else:
            detail = f"reader {reader} calm again; {dropped} card reads dropped"
            out.extend(self._clear(key, "reader_flood", detail, reader=reader))
        return out

    def board_status(self, now: float, online: bool) -> list[Action]:
        """Raise ``board_offline``, or clear it and re-apply the intended relay state."""
        out = self._advance(now)
        if not online:
            out.extend(self._raise("board_offline", "board_offline", "lock board not answering"))
            return out
        cleared = self._clear("board_offline", "board_offline", "lock board back online")
        if cleared:
            out.extend(cleared)
            out.extend(self.reapply(now))
        return out

    def board_rebooted(self, now: float) -> list[Action]:
        """Re-apply the intended relay state after the board restarted (its relays came up off)."""
        out = self._advance(now)
        if self.mode == "emergency_unlock":
            out.append(self._restart_release())
            out.append(self._relay(True, None))
        elif self._until is not None:
            # A window cut by the reboot is not re-opened: the person taps again.
            self._until = None
            self._passages.clear()
            out.append(self._relay(False))
            out.append(Emit("door.locked", {"door": self.id, "cause": "restart"}))
            out.append(Secured(self.id, "restart", now))
        else:
            out.append(self._relay(False))
        return out

    def restart(self, now: float) -> list[Action]:
        """Take control of the relay when the agent starts: assert the intended state and record it."""
        out = self._advance(now)
        self._until = None
        self._passages.clear()
        if self.mode == "emergency_unlock":
            out.append(self._restart_release())
            out.append(self._relay(True, None))
        else:
            out.append(Emit("door.locked", {"door": self.id, "cause": "restart"}))
            out.append(self._relay(False))
        return out

    def retire(self, now: float) -> list[Action]:
        """Lock for good: the door left the policy."""
        out = self._advance(now)
        self._until = None
        self._passages.clear()
        out.append(Emit("door.locked", {"door": self.id, "cause": "removed_from_policy"}))
        out.append(self._relay(False))
        return out

    def relay_report(self, now: float, commanded: bool, sensed: bool) -> list[Action]:
        """Take the board's read-back of the relay: a mismatch is a relay fault, a match clears it."""
        out = self._advance(now)
        if commanded != sensed:
            self._relay_fault = "sensed"
            states = ("on" if commanded else "off", "on" if sensed else "off")
            detail = f"relay {self.door.relay} commanded {states[0]}, sensed {states[1]}"
            out.extend(self._raise("relay_fault", "relay_fault", detail))
        elif self._relay_fault is not None:
            self._relay_fault = None
            out.extend(self._clear("relay_fault", "relay_fault", f"relay {self.door.relay} follows its command"))
        return out

    def relay_failed(self, now: float, detail: str) -> list[Action]:
        """Record that a relay command raised; the intended state is sent again on a later tick."""
        self._relay_fault = "command"
        self._retry_at = now + RELAY_RETRY_S
        return list(self._raise("relay_fault", "relay_fault", detail[:300]))

    def relay_succeeded(self, now: float) -> list[Action]:
        """Record that a relay command went through (clears a command failure)."""
        self._retry_at = None
        if self._relay_fault != "command":
            return []
        self._relay_fault = None
        return list(self._clear("relay_fault", "relay_fault", f"relay {self.door.relay} commands go through again"))

    def reapply(self, now: float) -> list[Action]:
        """Send the intended relay state again (after a board outage or a failed command)."""
        if self.mode == "emergency_unlock":
            return [self._relay(True, None)]
        if self._until is not None and self._until - now >= 0.001:
            return [self._relay(True, int((self._until - now) * 1000))]
        return [self._relay(False)]

    def update_door(self, now: float, door: Door) -> list[Action]:
        """Take a new policy's version of this door (timings, wiring, kind)."""
        if door.id != self.id:
            raise ValueError("a machine keeps its door id")
        out = self._advance(now)
        old = self.door
        self.door = door
        if door.sensor != old.sensor:
            self._sensor = Debouncer(self._debounce_s) if door.sensor is not None else None
            self._relock_deferred = False
        if self.mode == "emergency_unlock" and not emergency_capable(door):
            out.extend(self.set_mode(now, "normal", command_id=None))
        if door.relay != old.relay:
            out.append(SetRelay(old.relay, False, None))
            out.extend(self.reapply(now))
        return out

    # --- internals ----------------------------------------------------------------------------

    def _open_window(self, now: float, seconds: float) -> SetRelay:
        until = now + seconds
        if self._until is None or until >= self._until:
            self._until = until
            return self._relay(True, int(seconds * 1000))
        # A shorter request never cuts a longer window that is already running.
        return self._relay(True, int((self._until - now) * 1000))

    def _relay(self, on: bool, max_on_ms: int | None = None) -> SetRelay:
        self._relay_on = on
        return SetRelay(self.door.relay, on, max_on_ms if on else None)

    def _restart_release(self) -> Emit:
        return Emit("door.unlocked", compact({"door": self.id, "cause": "restart", "command_id": self.mode_command}))

    def _raise(
        self,
        key: str,
        kind: str,
        detail: str,
        *,
        reader: str | None = None,
        person: str | None = None,
        cause: str | None = None,
    ) -> list[Action]:
        if key in self._alarms:
            return []
        self._alarms.add(key)
        payload = {"door": self.id, "alarm": kind, "detail": detail, "reader": reader, "person": person, "cause": cause}
        return [Emit("door.alarm", compact(payload))]

    def _clear(self, key: str, kind: str, detail: str, *, reader: str | None = None) -> list[Action]:
        if key not in self._alarms:
            return []
        self._alarms.discard(key)
        payload = {"door": self.id, "alarm": kind, "detail": detail, "reader": reader}
        return [Emit("door.alarm_cleared", compact(payload))]

    def _held_due(self) -> float | None:
        if not self.door_open or self.mode == "emergency_unlock" or "held_open" in self._alarms:
            return None
        return None if self._held_from is None else self._held_from + self.door.held_open_s

    def _next_due(self) -> tuple[float, int] | None:
        candidates: list[tuple[float, int]] = []
        if self._sensor is not None and (due := self._sensor.due()) is not None:
            candidates.append((due, 0))
        if self._until is not None:
            candidates.append((self._until, 1))
        if (held := self._held_due()) is not None:
            candidates.append((held, 2))
        if self._retry_at is not None:
            candidates.append((self._retry_at, 3))
        return min(candidates) if candidates else None

    def _advance(self, now: float) -> list[Action]:
        out: list[Action] = []
        while (due := self._next_due()) is not None:
            at, kind = due
            if at > now:
                break
            if kind == 0:
                out.extend(self._settle(at))
            elif kind == 1:
                out.extend(self._window_ended(at))
            elif kind == 2:
                person = self._open_passages[0].person if self._open_passages else None
                detail = f"open longer than {self.door.held_open_s} s"
                out.extend(self._raise("held_open", "held_open", detail, person=person))
            else:
                self._retry_at = None
                out.extend(self.reapply(now))
        return out

    def _window_ended(self, at: float) -> list[Action]:
        self._until = None
        out: list[Action] = []
        if self._relay_on and self.mode == "normal":
            out.append(self._relay(False))
        if self.door_open:
            self._passages.clear()  # a grant given while the door stood open: it locks when it shuts
            return out
        if self._sensor is not None and self._sensor.pending and self._sensor.raw and self._raw_authorised:
            self._relock_deferred = True  # the door is opening; whether it counts is known after debounce
            return out
        out.extend(self._window_ended_unopened(at))
        return out

    def _window_ended_unopened(self, at: float) -> list[Action]:
        self._passages.clear()
        cause = "not_opened" if self._sensor is not None else "unlock_window_ended"
        return [Emit("door.locked", {"door": self.id, "cause": cause}), Secured(self.id, cause, at)]

    def _settle(self, at: float) -> list[Action]:
        assert self._sensor is not None
        previous, is_open = self._sensor.commit()
        if is_open:
            return self._opened(at, first_report=previous is None)
        if previous is None:
            return []  # the first report after start: closed, nothing happened
        return self._closed(at)

    def _opened(self, at: float, *, first_report: bool) -> list[Action]:
        self._open_since = self._held_from = at
        self._relock_deferred = False
        # The first report after the agent started cannot tell how the door got open: not called forced.
        forced = not first_report and not self._raw_authorised
        self._open_passages = () if forced else self._raw_passages
        person = self._open_passages[0].person if self._open_passages else None
        out: list[Action] = [Emit("door.opened", compact({"door": self.id, "forced": forced, "person": person}))]
        if forced:
            out.extend(self._raise("forced_open", "forced_open", "opened without a grant or unlock"))
        if self.mode != "emergency_unlock":
            # Open: release now whatever opened it; the lock latches again when the door shuts.
            self._until = None
            self._passages.clear()
            if self._relay_on:
                out.append(self._relay(False))
        out.append(Opened(self.id, self._open_passages, forced, at))
        return out

    def _closed(self, at: float) -> list[Action]:
        opened = self._open_since if self._open_since is not None else at
        person = self._open_passages[0].person if self._open_passages else None
        out: list[Action] = [
            Emit("door.closed", compact({"door": self.id, "open_seconds": max(0, int(at - opened)), "person": person}))
        ]
        out.extend(self._clear("held_open", "held_open", "door closed"))
        out.extend(self._clear("forced_open", "forced_open", "door closed"))
        self._open_since = self._held_from = None
        self._open_passages = ()
        if self.mode == "emergency_unlock":
            return out
        self._until = None
        self._passages.clear()
        if self._relay_on:
            out.append(self._relay(False))
        out.append(Emit("door.locked", {"door": self.id, "cause": "closed"}))
        out.append(Secured(self.id, "closed", at))
        return out
