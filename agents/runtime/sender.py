"""The drain loop: publish outbox events, and delete them only when the controller's signed ack says so.

One thread owns the in-flight window (seq → when published, wire). It wakes on a new event, an ack,
a (re)connect or the next resend deadline, and sleeps otherwise, so an idle agent costs no CPU.
The broker's PUBACK means nothing here: an event stays on disk until the controller has stored it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from sekisho.agents.runtime.errors import OutboxFull
from sekisho.agents.runtime.outbox import Outbox
from sekisho.agents.runtime.receipts import ReceiptKeeper
from sekisho.protocol import errors, messages, timefmt

log = logging.getLogger(__name__)

SYNC_LIMIT_MS = 2000
# An ack only tells the time if it answers something we published just now: acks that waited in the
# broker while we were offline carry an old controller_time and would fake a large offset.
_FRESH_ACK_S = 5.0
READ_CHUNK = 500
# Other local processes (the PAM login helper) append to the same outbox; while connected and idle,
# look for their rows this often (one indexed SELECT; negligible at idle).
OTHER_WRITERS_POLL_S = 2.0


# CLOCK_BOOTTIME keeps counting while the device sleeps and, like CLOCK_MONOTONIC, never jumps with the wall clock.
_BOOT_CLOCK = getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC)


def _boot_s() -> float:
    return time.clock_gettime(_BOOT_CLOCK)


class ClockEstimate:
    """The controller's clock as seen from here, anchored to a clock that does not jump.

    Each verified, fresh ack gives the controller's time at that moment; it is kept with the boot clock's
    reading then, so the controller's time now is that plus the boot clock's progress. A jump of the local
    wall clock (a bad NTP step, someone setting the date) therefore shows at once as an offset, in the next
    event's clock field and the next heartbeat, without waiting for another ack; and decisions that must not
    follow a jumped local clock (policy expiry, command validity) can use the controller's time instead.
    """

    def __init__(self, *, wall: Callable[[], float] = time.time, boot: Callable[[], float] = _boot_s) -> None:
        self._wall = wall
        self._boot = boot
        self._anchor: tuple[float, float] | None = None  # (controller epoch s, boot clock s) at the last ack

    def observe(self, controller_time: str, received_at: float) -> int:
        """Record one sample (controller_time minus local receive time); return the offset in ms."""
        moment = timefmt.parse(controller_time, "controller_time").timestamp()
        # The ack waited a little between arrival and here; take the boot clock back by that (bounded, in case
        # the wall clock jumped in between).
        waited = min(max(self._wall() - received_at, 0.0), 10.0)
        self._anchor = (moment, self._boot() - waited)
        return round((moment - received_at) * 1000)

    def controller_now(self) -> datetime | None:
        """Return the controller's time now, estimated from the last ack; None before the first ack."""
        if self._anchor is None:
            return None
        moment, at = self._anchor
        return datetime.fromtimestamp(moment + (self._boot() - at), UTC)

    def wall_now(self) -> datetime:
        """Return the local wall clock (UTC)."""
        return datetime.fromtimestamp(self._wall(), UTC)

    def reference_now(self) -> datetime:
        """Return the controller's time if known, else the local clock: for checking the controller's timestamps."""
        return self.controller_now() or self.wall_now()

    def fail_closed_now(self) -> datetime:
        """Return the later of the local clock and the controller's: an expiry either clock has reached has passed."""
        controller = self.controller_now()
        wall = self.wall_now()
        return wall if controller is None else max(wall, controller)

    def state(self) -> tuple[bool, int | None]:
        """Return (synced, offset_ms) for the next event's clock field."""
        offset = self.offset_ms
        return (offset is not None and abs(offset) < SYNC_LIMIT_MS, offset)

    @property
    def offset_ms(self) -> int | None:
        """Return the controller's clock minus ours now, in ms (None before the first ack)."""
        controller = self.controller_now()
        if controller is None:
            return None
        return round((controller.timestamp() - self._wall()) * 1000)


@dataclass
class SenderStats:
    """Counters for tests, heartbeats and benchmarks (written by the drain thread only)."""

    published: int = 0
    resent: int = 0
    acked: int = 0
    acks: int = 0
    forged_acks: int = 0
    publish_errors: int = 0
    # time.monotonic() of the last valid ack (the agents' metrics textfile reports its age).
    last_ack_at: float | None = None


class Sender:
    """Drains the outbox to the broker within a window of unacknowledged events."""

    def __init__(
        self,
        outbox: Outbox,
        publish: Callable[[bytes], bool],
        *,
        agent_id: str,
        controller_key: Ed25519PublicKey,
        clock: ClockEstimate,
        max_inflight: int = 1000,
        resend_after_s: float = 30.0,
        chunk: int = READ_CHUNK,
        receipts: ReceiptKeeper | None = None,
    ) -> None:
        self._outbox = outbox
        self._receipts = receipts
        self._publish = publish
        self._agent = agent_id
        self._key = controller_key
        self._clock = clock
        self._max_inflight = max_inflight
        self._resend_after = resend_after_s
        self._chunk = chunk
        self.stats = SenderStats()

        self._cond = threading.Condition()
        # Shared with other threads, guarded by _cond:
        self._stop = False
        self._connected = False
        self._reset = False
        self._full = False  # the outbox refused a delete for want of space (logged once per spell)
        self._new = True
        self._acks: list[tuple[bytes, float]] = []
        # Owned by the drain thread:
        self._inflight: dict[int, tuple[float, bytes]] = {}
        self._cursor = 0
        self._more = True
        self._highest_published = 0
        self._unacked_since: float | None = None
        self._thread: threading.Thread | None = None
        self._progress = threading.Condition()

    # --- called from other threads ----------------------------------------------------------------

    def start(self) -> None:
        """Start the drain thread."""
        self._thread = threading.Thread(target=self._run, name="outbox-sender", daemon=True)
        self._thread.start()

    @property
    def running(self) -> bool:
        """Tell whether the drain thread is alive (the service watchdog asks)."""
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the drain thread after the batch in hand."""
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._receipts is not None:
            self._receipts.flush()

    def notify_new(self) -> None:
        """Tell the sender that new events were stored."""
        with self._cond:
            self._new = True
            self._cond.notify()

    def on_connected(self) -> None:
        """Re-publish everything unacknowledged from the start of the outbox (the link is fresh)."""
        with self._cond:
            self._connected = True
            self._reset = True
            self._cond.notify()

    def on_disconnected(self) -> None:
        """Pause publishing until the next connect."""
        with self._cond:
            self._connected = False

    def resend_all(self) -> None:
        """Re-publish every unacknowledged event now (the `agent.resend` command)."""
        with self._cond:
            self._reset = True
            self._cond.notify()

    def offer_ack(self, raw: bytes) -> None:
        """Queue a message from the acks topic; it is verified on the drain thread, not the network's."""
        with self._cond:
            self._acks.append((raw, time.time()))
            self._cond.notify()

    @property
    def inflight(self) -> int:
        """Return how many events are published but not yet acknowledged."""
        return len(self._inflight)

    def wait_drained(self, timeout: float) -> bool:
        """Wait until the outbox is empty; return False on timeout."""
        deadline = time.monotonic() + timeout
        with self._progress:
            while self._outbox.depth() > 0:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._progress.wait(min(remaining, 1.0))
        return True

    # --- the drain thread ----------------------------------------------------------------------------

    def _can_fill(self) -> bool:
        return self._connected and (self._more or self._new) and len(self._inflight) < self._max_inflight

    def _resend_wait(self, now: float) -> float | None:
        if not self._connected or not self._inflight:
            return None
        oldest = next(iter(self._inflight.values()))[0]
        return oldest + self._resend_after - now

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._stop or self._acks or self._reset or self._can_fill()):
                    wait = self._resend_wait(time.monotonic())
                    if wait is not None and wait <= 0:
                        break
                    if self._connected:
                        wait = OTHER_WRITERS_POLL_S if wait is None else min(wait, OTHER_WRITERS_POLL_S)
                    if not self._cond.wait(wait) and self._connected:
                        self._new = True
                if self._stop:
                    return
                acks, self._acks = self._acks, []
                reset, self._reset = self._reset, False
                if self._new:
                    self._new = False
                    self._more = True
                connected = self._connected
            try:
                self._step(acks, reset, connected)
                self._full = False
            except OutboxFull as err:
                # A full disk refuses even the deletes of acknowledged events: they stay and are acked again
                # once there is room. Said once per spell, not every second.
                if not self._full:
                    log.error("%s; acknowledged events stay in the outbox until space is freed", err)
                self._full = True
                time.sleep(1.0)
                with self._cond:
                    self._reset = True
            except Exception:  # the loop must outlive any one failure; events stay in the outbox
                log.exception("outbox sender step failed; retrying in 1 s")
                time.sleep(1.0)
                with self._cond:
                    self._reset = True

    def _step(self, acks: list[tuple[bytes, float]], reset: bool, connected: bool) -> None:
        for raw, received_at in acks:
            self._apply_ack(raw, received_at)
        if acks:
            with self._progress:
                self._progress.notify_all()
        if reset:
            # Start again from the oldest stored event: whatever is unacknowledged goes out again.
            self._inflight.clear()
            self._cursor = 0
            self._more = True
        if connected:
            self._resend_overdue()
            self._fill_one_chunk()

    def _send(self, seq: int, wire: bytes, now: float) -> None:
        if not self._publish(wire):
            self.stats.publish_errors += 1
        if seq <= self._highest_published:
            self.stats.resent += 1
        else:
            self.stats.published += 1
            self._highest_published = seq
        self._inflight[seq] = (now, wire)

    def _fill_one_chunk(self) -> None:
        room = self._max_inflight - len(self._inflight)
        if room <= 0 or not self._more:
            return
        want = min(room, self._chunk)
        rows = self._outbox.pending(self._cursor, want)
        if len(rows) < want:
            self._more = False
        now = time.monotonic()
        for seq, wire in rows:
            self._send(seq, wire, now)
            self._cursor = seq

    def _resend_overdue(self) -> None:
        now = time.monotonic()
        due = []
        for seq, (published_at, _wire) in self._inflight.items():
            if now - published_at < self._resend_after:
                break  # insertion order is publish order, so the rest are younger
            due.append(seq)
        if due:
            # Log the start of a spell without acks once, not every resend round.
            if self._unacked_since is None:
                self._unacked_since = now
                log.warning(
                    "controller has not acknowledged %d events within %.0f s; re-publishing until it does",
                    len(due),
                    self._resend_after,
                )
            else:
                log.debug("re-publishing %d unacknowledged events", len(due))
        for seq in due:
            _published_at, wire = self._inflight.pop(seq)
            self._send(seq, wire, now)

    def _apply_ack(self, raw: bytes, received_at: float) -> None:
        try:
            ack = messages.open_ack(raw, self._key, self._agent)
        except errors.Rejected as err:
            # A forged or garbled ack deletes nothing; the events are resent and acked for real later.
            self.stats.forged_acks += 1
            if self.stats.forged_acks == 1 or self.stats.forged_acks % 1000 == 0:
                log.warning("ignored %d invalid ack(s); latest: %s", self.stats.forged_acks, err.reason)
            return
        self.stats.acks += 1
        self.stats.last_ack_at = time.monotonic()
        if self._receipts is not None and ack.receipt is not None:
            self._receipts.keep(raw, ack)
        if self._unacked_since is not None:
            log.info("controller acknowledging again after %.0f s", time.monotonic() - self._unacked_since)
            self._unacked_since = None
        fresh = False
        horizon = time.monotonic() - _FRESH_ACK_S
        for lo, hi in ack.ranges:
            # Walk whichever is shorter: the range, or the window.
            seqs: Iterable[int] = (
                range(lo, hi + 1) if hi - lo < len(self._inflight) else [s for s in self._inflight if lo <= s <= hi]
            )
            for seq in seqs:
                entry = self._inflight.pop(seq, None)
                if entry is not None and entry[0] >= horizon:
                    fresh = True
        if fresh:
            self._clock.observe(ack.controller_time, received_at)
        self.stats.acked += self._outbox.remove_ranges(ack.ranges)
