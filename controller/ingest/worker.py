"""Ingest: MQTT events → decoded → signature-verified → stored in one transaction per batch → acked.

Ordering is what makes "lose nothing" hold: the MQTT PUBACK to the broker and the signed ack to the
agent are both sent only after the batch transaction has committed. If this process dies mid-batch,
the broker redelivers (persistent session, manual acks) and the agent resends (no ack seen), and
storage is idempotent on (agent, seq), so the result is exactly one row per event.

Two threads share the work, in a pipeline: the check thread collects a batch, decodes it and verifies
every signature; the store thread stores the checked batch, then acknowledges it. So the next batch is
checked while the previous one is written (libsodium's verification and SQLite's fsync both run without
the GIL), and batches are still stored and acknowledged one at a time, in the order they arrived.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from sekisho.controller.config import ControllerConfig
from sekisho.controller.ingest.lag import LagHistogram
from sekisho.controller.ingest.ownership import OwnershipCheck
from sekisho.controller.ingest.storage_full import storage_full
from sekisho.controller.mqtt import connect_blocking, make_client
from sekisho.controller.store.events import BatchResult, DeadLetterIn
from sekisho.controller.store.store import Store
from sekisho.protocol import errors, events, messages, signing, timefmt, topics
from sekisho.protocol.canonical import loads_strict

log = logging.getLogger(__name__)

# Reasons for which the agent's own signature still verifies: the agent really sent this, the
# dead letter keeps it, so the agent may drop it from its outbox. Anything else is not acked,
# because an unverified sequence number must never make an agent delete a real event.
_ACKABLE_WHEN_SIGNED = {errors.SCHEMA, errors.UNKNOWN_TYPE, errors.MY_NUMBER, errors.UNSUPPORTED_VERSION}
# A signed event about a door, terminal or area its sender does not own: possible tampering.
NOT_OWNER_FINDING = "not_owner"
# An event signed with an agent's replaced key, accepted within the rotation's grace window: auditors see it.
REPLACED_KEY_FINDING = "replaced_key"


@dataclass
class IngestStats:
    """Counters exposed to the API's readiness endpoint and to the benchmark."""

    received: int = 0
    stored: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    heartbeats: int = 0
    batches: int = 0
    store_errors: int = 0
    connected: bool = False
    last_batch_at: float | None = None
    reasons: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    # Messages received and not yet stored, dead-lettered or released; and when the last batch finished.
    waiting: int = 0
    last_progress_at: float = field(default_factory=time.time)
    stall_s: float = 60.0
    # Recorded by the agent → stored here, per event stored (controller/ingest/lag.py; /metrics shows it).
    lag: LagHistogram = field(default_factory=LagHistogram)
    # Set while the store refuses writes for want of space (controller/ingest/storage_full.py); None otherwise.
    storage_full: str | None = None

    def stalled(self, now: float | None = None) -> bool:
        """Tell whether messages wait while nothing has been finished for longer than stall_s."""
        idle = (time.time() if now is None else now) - self.last_progress_at
        return self.waiting > 0 and idle > self.stall_s


@dataclass(frozen=True, slots=True)
class _Incoming:
    topic: str
    payload: bytes
    mid: int
    qos: int


@dataclass(slots=True)
class _Checked:
    """A batch after decoding and the signature checks, waiting for the store thread."""

    received_at: datetime
    good: list[events.DecodedEvent] = field(default_factory=list)
    dead: list[DeadLetterIn] = field(default_factory=list)
    heartbeats: list[messages.Heartbeat] = field(default_factory=list)
    # Events signed with a key a rotation replaced, accepted within its grace window (a finding once stored).
    replaced: set[tuple[str, int]] = field(default_factory=set)


# Checked batches waiting for the store: enough to keep it busy, few enough to bound memory and to leave the
# rest with the broker (unacknowledged, so redelivered if this process dies).
_CHECKED_AHEAD = 2


class KeyRing:
    """Agents' registered public keys, re-read from the store periodically so revocation spreads.

    Only keys that a controller-signed line of the agent's key history vouches for are used: a key
    written into ``agents`` by anyone without the controller's signing key accepts no event. Besides the key
    in force it holds, per agent, the key a rotation replaced (with the end of its grace window) and a
    revoked agent's last key (only to prove that a refused event came from it, so it can be acknowledged).
    """

    def __init__(self, store: Store, refresh_s: float, controller_key: Ed25519PublicKey) -> None:
        self._store = store
        self._refresh_s = refresh_s
        self._controller = signing.Verifier(controller_key)
        self._refused: frozenset[str] = frozenset()
        self._keys: dict[str, signing.Verifier] = {}
        self._public: dict[str, Ed25519PublicKey] = {}
        self._previous: dict[str, tuple[signing.Verifier, datetime]] = {}
        self._revoked: dict[str, signing.Verifier] = {}
        self._loaded_at = 0.0

    def get(self, agent_id: str) -> signing.Verifier | None:
        """Return an active agent's key, refreshing the cache when stale or when the agent is unknown."""
        now = time.monotonic()
        if now - self._loaded_at > self._refresh_s or (agent_id not in self._keys and now - self._loaded_at > 1.0):
            self.reload()
        return self._keys.get(agent_id)

    def previous(self, agent_id: str) -> tuple[signing.Verifier, datetime] | None:
        """Return the key the agent's last rotation replaced and the end of its grace window, if it has one."""
        return self._previous.get(agent_id)

    def revoked(self, agent_id: str) -> signing.Verifier | None:
        """Return a revoked agent's last key (to recognise its events, never to accept them)."""
        return self._revoked.get(agent_id)

    def public_key(self, agent_id: str) -> Ed25519PublicKey | None:
        """Return an active agent's key as a cryptography object (for the slower, general checks)."""
        self.get(agent_id)
        return self._public.get(agent_id)

    def reload(self) -> None:
        """Re-read all agents' vouched keys from the store."""
        sets, refused = self._store.vouched_key_sets(self._controller)
        if set(refused) - self._refused:
            # Logged once per change: an agent whose key no signed key line vouches for sends in vain.
            log.error("ingest: no controller-signed key line vouches for the key of %s; their events are refused",
                      ", ".join(sorted(set(refused) - self._refused)))  # fmt: skip
        self._refused = frozenset(refused)
        load = signing.load_public_key_pem
        self._public = {a: load(k.current.encode()) for a, k in sets.items() if k.current is not None}
        self._keys = {a: signing.Verifier(k) for a, k in self._public.items()}
        self._previous = {
            a: (signing.Verifier(load(k.previous.encode())), k.previous_until)
            for a, k in sets.items()
            if k.previous is not None and k.previous_until is not None
        }
        self._revoked = {
            a: signing.Verifier(load(k.revoked_key.encode())) for a, k in sets.items() if k.revoked_key is not None
        }
        self._loaded_at = time.monotonic()


class ReceiptTakers:
    """The agents that asked for receipts in their acks, re-read from the store like the keys.

    An older agent refuses an ack with a field it does not know (and would then never drop its events), so
    only agents whose latest heartbeat says ``receipts`` get one. A heartbeat this worker handles counts at
    once; those other workers handled are read from ``agents.last_heartbeat`` every refresh_s.
    """

    def __init__(self, store: Store, refresh_s: float) -> None:
        self._store = store
        self._refresh_s = refresh_s
        self._agents: set[str] = set()
        self._loaded_at: float | None = None

    def heard(self, hb: messages.Heartbeat) -> None:
        """Take note of a heartbeat: the agent asks for receipts, or (downgraded) no longer does."""
        if hb.receipts is not None:
            self._agents.add(hb.agent)
        else:
            self._agents.discard(hb.agent)

    def receipt(self, agent_id: str, result: BatchResult) -> messages.Receipt | None:
        """Return the receipt for the agent's stream after the batch, if it takes receipts and the batch moved it."""
        head = result.heads.get(agent_id)
        if head is None or result.checkpoint is None or result.checkpoint_hash is None:
            return None
        now = time.monotonic()
        if self._loaded_at is None or now - self._loaded_at > self._refresh_s:
            self._agents = set(self._store.receipt_agents())
            self._loaded_at = now
        if agent_id not in self._agents:
            return None
        length, digest = head
        return messages.Receipt(
            length=length, head=digest, checkpoint=result.checkpoint, checkpoint_hash=result.checkpoint_hash
        )


def _signed_by(decoded: events.DecodedEvent, key: signing.Verifier) -> bool:
    try:
        decoded.verify(key)
    except errors.Rejected:
        return False
    return True


class IngestWorker:
    """One ingest worker; several may run (in several processes) on one MQTT shared subscription."""

    def __init__(
        self,
        config: ControllerConfig,
        store: Store,
        *,
        on_heartbeat: Callable[[messages.Heartbeat], None] | None = None,
        on_stored: Callable[[frozenset[str]], None] | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.stats = IngestStats(stall_s=config.ingest_stall_s)
        self._signing_key: Ed25519PrivateKey = signing.load_private_key(config.signing_key)
        self._keys = KeyRing(store, config.key_refresh_s, self._signing_key.public_key())
        self._owners = OwnershipCheck(store, config.key_refresh_s)
        self._receipts = ReceiptTakers(store, config.key_refresh_s)
        self._queue: queue.Queue[_Incoming] = queue.Queue()
        self._checked: queue.Queue[tuple[list[_Incoming], _Checked | None]] = queue.Queue(maxsize=_CHECKED_AHEAD)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._checker: threading.Thread | None = None
        self._on_heartbeat = on_heartbeat
        # Told the event types of each batch committed (the alert engine in this process looks at once).
        self._on_stored = on_stored
        self._client = make_client(config, f"{config.worker_id}-ingest", manual_ack=True)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message

    # --- MQTT callbacks (network thread): only enqueue, never block on the database -------------

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            return
        if not self.stats.connected:
            log.info("ingest %s connected to broker", self.config.worker_id)
        self.stats.connected = True
        group = self.config.share_group
        client.subscribe(
            [
                (topics.all_agents(topics.EVENTS, shared_group=group), 1),
                (topics.all_agents(topics.HEARTBEAT, shared_group=group), 0),
            ]
        )

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if self.stats.connected and not self._stop.is_set():
            log.warning("ingest %s lost the broker (%s); reconnecting", self.config.worker_id, reason)
        self.stats.connected = False

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        self.stats.waiting += 1
        self._queue.put(_Incoming(msg.topic, bytes(msg.payload), msg.mid, msg.qos))

    # --- lifecycle --------------------------------------------------------------------------------

    def start(self) -> None:
        """Connect to the broker and start the check and store threads."""
        self._keys.reload()
        self._checker = threading.Thread(target=self._check_loop, name="ingest-check", daemon=True)
        self._thread = threading.Thread(target=self._run, name="ingest", daemon=True)
        self._checker.start()
        self._thread.start()
        connect_blocking(self._client, self.config, persistent=True)

    def stop(self) -> None:
        """Finish the batches in hand, then disconnect."""
        self._stop.set()
        deadline = time.monotonic() + 30  # one budget for both: a store that is down keeps both waiting
        for thread in (self._checker, self._thread):
            if thread is not None:
                thread.join(timeout=max(0.1, deadline - time.monotonic()))
        self._client.disconnect()
        self._client.loop_stop()

    @property
    def running(self) -> bool:
        """Tell whether the check and store threads are alive (the service watchdog asks)."""
        threads = (self._checker, self._thread)
        return all(thread is not None and thread.is_alive() for thread in threads)

    @property
    def client(self) -> mqtt.Client:
        """The MQTT client (the policy publisher shares it)."""
        return self._client

    # --- the batch loop ---------------------------------------------------------------------------

    def _collect(self) -> list[_Incoming]:
        try:
            first = self._queue.get(timeout=0.5)
        except queue.Empty:
            return []
        batch = [first]
        deadline = time.monotonic() + self.config.batch_wait_ms / 1000
        while len(batch) < self.config.batch_max:
            try:
                batch.append(self._queue.get_nowait())
                continue
            except queue.Empty:
                pass
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                batch.append(self._queue.get(timeout=remaining))
            except queue.Empty:
                break
        return batch

    def _check_loop(self) -> None:
        """Collect and check batches, handing them to the store thread in arrival order."""
        while not (self._stop.is_set() and self._queue.empty()):
            batch = self._collect()
            if not batch:
                continue
            checked: _Checked | None = None
            try:
                checked = self._check(batch)
            except Exception:  # the checks turn bad input into dead letters; this is for a bug in them
                log.exception("ingest: checking %d message(s) failed; the store thread checks them again", len(batch))
            while True:
                try:
                    self._checked.put((batch, checked), timeout=0.5)
                    break
                except queue.Full:
                    if self._thread is not None and not self._thread.is_alive():
                        return  # nobody stores any more; the broker keeps the batch (never acknowledged)

    def _next_checked(self) -> tuple[list[_Incoming], _Checked | None]:
        try:
            return self._checked.get(timeout=0.5)
        except queue.Empty:
            return [], None

    def _checking(self) -> bool:
        return self._checker is not None and self._checker.is_alive()

    def _run(self) -> None:
        pending: list[_Incoming] = []
        checked: _Checked | None = None  # the check thread's work on pending, used on its first attempt
        single = False  # after a batch failed ingest_attempts times: one message at a time
        attempts = 0
        backoff = 0.2
        while not (self._stop.is_set() and not pending and self._checked.empty() and not self._checking()):
            if not pending:
                (pending, checked), single, attempts = self._next_checked(), False, 0
                if not pending:
                    continue
            current = pending[:1] if single else pending
            giving_up = single and attempts >= self.config.ingest_attempts
            try:
                if giving_up:
                    self._give_up(current[0])
                elif checked is not None:
                    self._commit(current, checked)
                else:
                    # A retry checks again: keys may have been reloaded since, and a split batch needs its own.
                    self.process(current)
            except Exception as err:  # the loop must survive anything; what failed is retried, never dropped
                checked = None
                self.stats.store_errors += 1
                full = storage_full(err)
                if full is not None:
                    # Out of space is the store's outage, not these messages' fault: keep them (not acked, so
                    # they stay in the agents' outboxes and the broker), never count towards a dead letter,
                    # and say so once, not once per retry.
                    if self.stats.storage_full is None:
                        log.error(
                            "ingest: the database is out of space (%s); storing and acknowledging nothing until "
                            "space is freed: events wait in the agents' outboxes; retrying",
                            full,
                        )
                    self.stats.storage_full = full
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, 10.0)
                    continue
                # A store that refuses even the dead letter is down (not this message's fault): start this
                # message's count again, so it is stored normally once the store is back.
                attempts = 0 if giving_up else attempts + 1
                log.exception("ingest of %d message(s) failed (attempt %d)", len(current), attempts)
                if not single and attempts >= self.config.ingest_attempts:
                    # Find the message that breaks the batch, so the others are stored meanwhile.
                    single = True
                    if len(pending) > 1:
                        attempts = 0
                        continue
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)
                continue
            if self.stats.storage_full is not None:
                log.warning("ingest: the database accepts writes again; storing the events that waited")
                self.stats.storage_full = None
            backoff = 0.2
            attempts = 0
            checked = None
            pending = pending[len(current) :]

    def _give_up(self, item: _Incoming) -> None:
        """Keep a message the store refused again and again as a dead letter, then release it.

        If even the dead letter cannot be stored, the store itself is down: that raises, and the loop
        retries with back-off, losing nothing.
        """
        agent = item.topic.split("/")[3] if item.topic.count("/") >= 4 else None
        letter = DeadLetterIn(
            topic=item.topic,
            raw=item.payload,
            reason=errors.UNPROCESSABLE,
            detail=f"not stored after {self.config.ingest_attempts} attempts",
            agent_id=agent if agent and topics.AGENT_ID.fullmatch(agent) else None,
        )
        self.store.store_batch([], [letter], timefmt.now())
        self.stats.dead_lettered += 1
        self.stats.reasons[errors.UNPROCESSABLE] += 1
        log.error("ingest: a message on %s was %s; kept as a dead letter", item.topic, letter.detail)
        self._release([item])

    def _release(self, batch: list[_Incoming]) -> None:
        """PUBACK finished messages and note the progress."""
        # One ack() per message through paho's public API: writing the PUBACKs as one packet through its
        # private queue measured no faster in bench ingest (docs/benchmarks.md) and tied us to its internals.
        for item in batch:
            if item.qos > 0:
                self._client.ack(item.mid, item.qos)
        self.stats.waiting = max(0, self.stats.waiting - len(batch))
        self.stats.last_progress_at = time.time()

    def _key_refusal(
        self, decoded: events.DecodedEvent, item: _Incoming, received_at: datetime, replaced: set[tuple[str, int]]
    ) -> DeadLetterIn | None:
        """Check the event's signature against the agent's keys; return the dead letter if it is refused.

        Raises Rejected (not acknowledged) when nothing proves the agent sent it. Signed by a revoked agent, or
        by a replaced key after its grace window: a dead letter the agent may drop (acknowledged), since
        resending cannot change the answer. Signed by the replaced key within the window: accepted, noted in
        `replaced` (a finding is raised once it is stored).
        """
        agent = decoded.agent
        key = self._keys.get(agent)
        if key is None:
            revoked = self._keys.revoked(agent)
            if revoked is not None and _signed_by(decoded, revoked):
                detail = f"agent {agent!r} is revoked"
                letter = DeadLetterIn(item.topic, item.payload, errors.REVOKED_AGENT, detail, agent_id=agent)
                return replace(letter, seq=decoded.seq, event_id=decoded.id, ackable=True)
            raise errors.Rejected(errors.UNKNOWN_AGENT, f"agent {agent!r} is not registered")
        if _signed_by(decoded, key):
            return None
        previous = self._keys.previous(agent)
        if previous is None or not _signed_by(decoded, previous[0]):
            decoded.verify(key)  # raises the signature error
            return None
        until = previous[1]
        if received_at < until:
            replaced.add((agent, decoded.seq))
            return None
        detail = f"signed with the key replaced before {timefmt.fmt(until)}, the end of its grace window"
        letter = DeadLetterIn(item.topic, item.payload, errors.STALE_KEY, detail, agent_id=agent)
        return replace(letter, seq=decoded.seq, event_id=decoded.id, ackable=True)

    def process(self, batch: list[_Incoming]) -> None:
        """Decode, verify, store and acknowledge one batch of messages."""
        self._commit(batch, self._check(batch))

    def _check(self, batch: list[_Incoming]) -> _Checked:
        """Decode and verify a batch: the verified events, the dead letters and the heartbeats in it."""
        checked = _Checked(received_at=timefmt.now())
        received_at, replaced = checked.received_at, checked.replaced
        good, dead, heartbeats = checked.good, checked.dead, checked.heartbeats
        for item in batch:
            self.stats.received += 1
            try:
                agent, channel = topics.parse(item.topic)
            except errors.Rejected as err:
                dead.append(DeadLetterIn(item.topic, item.payload, err.reason, err.detail))
                continue
            if channel == topics.HEARTBEAT:
                hb = self._open_heartbeat(agent, item)
                if hb is not None:
                    heartbeats.append(hb)
                continue
            try:
                decoded = events.decode_event(item.payload, topic_agent=agent)
                refused = self._key_refusal(decoded, item, received_at, replaced)
                if refused is not None:
                    dead.append(refused)
                    continue
                refusal = self._owners.refusal(decoded)
                if refusal is not None:
                    # Proven to come from this agent (so acked: resending would change nothing) but about
                    # something it does not drive: kept as evidence, never projected into a register.
                    letter = DeadLetterIn(item.topic, item.payload, errors.NOT_OWNER, refusal, agent_id=decoded.agent)
                    dead.append(replace(letter, seq=decoded.seq, event_id=decoded.id, ackable=True))
                    continue
                good.append(decoded)
            except errors.Rejected as err:
                dead.append(self._dead_letter(item, agent, err))
            except Exception as err:  # a check defeated by its input must cost that message only
                log.warning("ingest: a message on %s raised %s while being checked", item.topic, type(err).__name__)
                detail = f"{type(err).__name__} while checking"
                dead.append(DeadLetterIn(item.topic, item.payload, errors.UNPROCESSABLE, detail, agent_id=agent))
        return checked

    def _commit(self, batch: list[_Incoming], checked: _Checked) -> None:
        """Store a checked batch in one transaction, then acknowledge it to the agents and the broker."""
        received_at, replaced = checked.received_at, checked.replaced
        good, dead, heartbeats = checked.good, checked.dead, checked.heartbeats
        result = self.store.store_batch(good, dead, received_at)
        if self._on_stored is not None and result.stored:
            self._on_stored(frozenset(e.type for e in good))
        for letter in dead:
            if letter.reason == errors.NOT_OWNER and letter.agent_id is not None:
                log.warning("ingest: %s sent a fact it does not own: %s", letter.agent_id, letter.detail)
                self.store.note_finding(
                    NOT_OWNER_FINDING,
                    letter.agent_id,
                    letter.seq,
                    {"reason": "possible tampering", "detail": letter.detail, "event_id": letter.event_id},
                )
        for agent_id, seq in sorted(replaced & set(result.stored)):
            log.warning(
                "ingest: %s event %d signed with its replaced key, accepted within the grace window", agent_id, seq
            )
            self.store.note_finding(
                REPLACED_KEY_FINDING,
                agent_id,
                seq,
                {"reason": "signed with the key a rotation replaced, received within its grace window"},
            )
        for hb in heartbeats:
            self.store.record_heartbeat(hb.agent, hb.model_dump(), received_at)
        self.stats.batches += 1
        self.stats.stored += len(result.stored)
        stored_at = timefmt.now()
        stored_keys = set(result.stored)
        for ev in good:
            if (ev.agent, ev.seq) in stored_keys:
                self.stats.lag.observe((stored_at - ev.occurred_at).total_seconds())
        self.stats.duplicates += len(result.duplicates)
        self.stats.dead_lettered += len(result.dead_lettered)
        self.stats.heartbeats += len(heartbeats)
        self.stats.last_batch_at = time.time()
        for d in dead:
            self.stats.reasons[d.reason] += 1

        # Committed: now tell each agent which of its events are safe to drop, then release the broker.
        to_ack: dict[str, list[int]] = defaultdict(list)
        for agent_id, seq in [*result.stored, *result.duplicates]:
            to_ack[agent_id].append(seq)
        for d in dead:
            if d.agent_id is not None and d.seq is not None and d.ackable:
                to_ack[d.agent_id].append(d.seq)
        # The store may dead-letter verified events too (reused event id or seq); those are signed, so ack.
        verified = {(ev.agent, ev.seq) for ev in good}
        for letter_agent, letter_seq in result.dead_lettered:
            if letter_agent is not None and letter_seq is not None and (letter_agent, letter_seq) in verified:
                to_ack[letter_agent].append(letter_seq)
        for hb in heartbeats:
            self._receipts.heard(hb)
        for agent_id, seqs in to_ack.items():
            receipt = self._receipts.receipt(agent_id, result)
            ack = messages.build_ack(self._signing_key, agent_id, seqs, receipt=receipt)
            self._client.publish(topics.topic(agent_id, topics.ACKS), ack, qos=1)
        self._release(batch)
        for hb in heartbeats:
            if self._on_heartbeat is not None:
                self._on_heartbeat(hb)

    def _open_heartbeat(self, agent: str, item: _Incoming) -> messages.Heartbeat | None:
        key = self._keys.public_key(agent)
        try:
            if key is None:
                raise errors.Rejected(errors.UNKNOWN_AGENT, f"agent {agent!r} is not registered")
            return messages.open_heartbeat(item.payload, key, agent)
        except Exception as err:  # Rejected, or a check defeated by its input: either way, not this heartbeat
            # Heartbeats are not records; count the reason instead of filling the dead-letter table.
            reason = err.reason if isinstance(err, errors.Rejected) else errors.UNPROCESSABLE
            self.stats.reasons[f"heartbeat_{reason}"] += 1
            log.debug("heartbeat from %s refused: %s", agent, reason)
            return None

    def _dead_letter(self, item: _Incoming, topic_agent: str, err: errors.Rejected) -> DeadLetterIn:
        """Build a dead letter, marking it ackable only when the agent's own signature proves origin."""
        agent_id, seq, event_id, ackable = topic_agent, None, None, False
        try:
            doc = loads_strict(item.payload, max_size=events.MAX_EVENT_BYTES)
            body = doc["event"]
            claimed_seq, claimed_id = body.get("seq"), body.get("id")
            if isinstance(claimed_seq, int) and not isinstance(claimed_seq, bool) and claimed_seq >= 1:
                seq = claimed_seq
            if isinstance(claimed_id, str) and len(claimed_id) == 32:
                event_id = claimed_id
            if err.reason in _ACKABLE_WHEN_SIGNED and body.get("agent") == topic_agent and seq is not None:
                key = self._keys.public_key(topic_agent)
                if key is not None:
                    signing.verify(key, "event", body, doc["sig"])
                    ackable = True
        except Exception:  # noqa: S110 - best effort: a dead letter without seq or ack is still kept
            pass
        return DeadLetterIn(
            topic=item.topic,
            raw=item.payload,
            reason=err.reason,
            detail=err.detail,
            agent_id=agent_id,
            seq=seq,
            event_id=event_id,
            ackable=ackable,
        )
