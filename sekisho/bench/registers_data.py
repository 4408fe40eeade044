"""The data behind `sekisho bench registers`: a synthetic site, millions of signed events, bulk-loaded and projected.

Going through MQTT ingest would take hours at 10 million events, so the bench writes what ingest would have
stored: every event is a real signed envelope (Ed25519, the agent's key registered in the store), stored with
its hash-chain columns (chain.record_hash, format 2) and the streams rows; one signed ingest checkpoint then
names every stream head, so the console's "do the chains behind these rows verify" walks real chains.

The door registers are filled the way the door projection fills them: door_log rows are made by the
projection's own door-log mapping (stateless, so bulk-inserted), and key loans, area presence and visits
(stateful) by the projection's own apply functions, in event-id order, in large transactions.
``projection_matches`` rebuilds them with DoorProjector.rebuild() and compares: the test does so.

Every person, card, login and serial is synthetic; nothing looks like a My Number (the guard runs on decode).
"""

from __future__ import annotations

import hashlib
import heapq
import json
import random
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import Connection, Engine, Table, func, insert, select, update

from sekisho.controller.doors import apply as door_apply
from sekisho.controller.doors.projector import CURSOR, REGISTER_TABLES, DoorProjector

__all__ = ["REGISTER_TABLES"]
from sekisho.controller.policy.service import PolicyService
from sekisho.controller.store import Store
from sekisho.controller.store.chain import record_hash, subject_columns
from sekisho.controller.store.checkpoints import INGEST, append, head_fields, lock_log
from sekisho.controller.store.db import write_transaction
from sekisho.controller.store.events import EVENT_COLUMNS
from sekisho.controller.store.models import Event, ProjectionCursor, Stream
from sekisho.protocol import PROTOCOL_VERSION, signing, timefmt
from sekisho.protocol.canonical import canonical_bytes
from sekisho.protocol.catalogue import DoorAccessGranted
from sekisho.protocol.events import EVENT_TYPES
from sekisho.protocol.policy import (
    Area,
    Card,
    Door,
    DoorReader,
    KeyCabinet,
    KeySlot,
    Person,
    Site,
    SitePolicy,
    Terminal,
)

EVENTS = cast(Table, Event.__table__)
STREAMS = cast(Table, Stream.__table__)
CURSORS = cast(Table, ProjectionCursor.__table__)

AREAS = 4
LOCKERS_PER_AREA = 10
SLOTS_PER_CABINET = 8
TERMINALS = 40
DEPARTMENTS = ("人事部", "経理部", "総務部", "情報システム部", "法務部", "営業管理部")
# Kana for the synthetic names: a family reading per department, a given reading per index.
_FAMILY = (("試験", "しけん"), ("見本", "みほん"), ("仮名", "かめい"), ("例示", "れいじ"), ("検証", "けんしょう"))
_GIVEN = (("一郎", "いちろう"), ("花子", "はなこ"), ("次郎", "じろう"), ("桜", "さくら"), ("健", "けん"))


def _uid_hash(label: str) -> str:
    # A synthetic card: the hash of a made-up label stands in for HMAC(site key, UID).
    return hashlib.sha256(f"sekisho-bench-registers/{label}".encode()).hexdigest()


@dataclass(frozen=True)
class SiteShape:
    """The synthetic site: its policy and the ids the generator and the queries pick from."""

    policy: SitePolicy
    staff: tuple[str, ...]
    visitors: tuple[str, ...]
    rooms: tuple[str, ...]
    lockers: tuple[str, ...]
    cabinets: tuple[str, ...]
    terminals: tuple[str, ...]
    door_agents: dict[str, str]
    terminal_agents: dict[str, str]
    area_of: dict[str, str]
    logins: dict[str, str]

    @property
    def agents(self) -> list[str]:
        """Return every agent id of the site (door agents, then terminals)."""
        return sorted(set(self.door_agents.values())) + sorted(self.terminal_agents.values())


def site_shape(people: int = 300, visitors: int = 10) -> SiteShape:
    """Return the bench's synthetic site: areas with a room door, lockers and a key cabinet each; terminals."""
    persons: list[Person] = []
    cards: list[Card] = []
    logins: dict[str, str] = {}
    for i in range(people):
        pid = f"p-{i + 1:04d}"
        fam, fam_kana = _FAMILY[i % len(_FAMILY)]
        given, given_kana = _GIVEN[(i // len(_FAMILY)) % len(_GIVEN)]
        login = f"u{i + 1:04d}"
        logins[pid] = login
        persons.append(
            Person(
                id=pid,
                name=f"{fam} {given}{i + 1:04d}",
                kana=f"{fam_kana} {given_kana}",
                department=DEPARTMENTS[i % len(DEPARTMENTS)],
                roles=["designated_handler"],
                logins=[login],
            )
        )
        cards.append(Card(id=f"c-{i + 1:04d}", person=pid, uid_hash=_uid_hash(pid)))
    guests: list[str] = []
    for i in range(visitors):
        pid = f"v-{i + 1:03d}"
        guests.append(pid)
        persons.append(
            Person(
                id=pid,
                name=f"来訪 客{i + 1:03d} (synthetic)",
                kana="らいほう きゃく",
                department="外部委託先",
                roles=["visitor"],
            )
        )
        cards.append(Card(id=f"c-v-{i + 1:03d}", person=pid, kind="osdp", uid_hash=_uid_hash(pid)))
    staff = tuple(p.id for p in persons if p.id.startswith("p-"))
    areas = [Area(id=f"a-{a + 1:02d}", name=f"管理区域 {a + 1:02d}") for a in range(AREAS)]
    doors: list[Door] = []
    cabinets: list[KeyCabinet] = []
    door_agents: dict[str, str] = {}
    area_of: dict[str, str] = {}
    for a in range(AREAS):
        area, agent = f"a-{a + 1:02d}", f"door-{a + 1:02d}"
        room = f"room-{a + 1:02d}"
        doors.append(
            Door(
                id=room,
                name=f"管理区域 {a + 1:02d} 扉",
                kind="room",
                agent=agent,
                area=area,
                allowed=[*staff, *guests],
                readers=[
                    DoorReader(id=f"rdr-{a + 1:02d}-in", direction="entry"),
                    DoorReader(id=f"rdr-{a + 1:02d}-out", direction="exit"),
                ],
            )
        )
        for n in range(LOCKERS_PER_AREA):
            doors.append(
                Door(
                    id=f"locker-{a + 1:02d}-{n + 1:02d}",
                    name=f"ロッカー {a + 1:02d}-{n + 1:02d}",
                    kind="locker",
                    agent=agent,
                    area=area,
                    allowed=list(staff),
                    relay=n + 1,
                )
            )
        cabinet = f"keys-{a + 1:02d}"
        doors.append(
            Door(
                id=cabinet,
                name=f"鍵管理ボックス {a + 1:02d}",
                kind="key_cabinet",
                agent=agent,
                area=area,
                allowed=list(staff),
                relay=LOCKERS_PER_AREA + 1,
            )
        )
        cabinets.append(
            KeyCabinet(
                door=cabinet,
                slots=[
                    KeySlot(index=s, key=f"k-{a + 1:02d}-{s + 1:02d}", name=f"鍵 {a + 1:02d}-{s + 1:02d}")
                    for s in range(SLOTS_PER_CABINET)
                ],
            )
        )
        for d in doors:
            if d.area == area:
                door_agents[d.id] = agent
                area_of[d.id] = area
    terminals = [
        Terminal(
            id=f"t-{i + 1:03d}", name=f"端末 {i + 1:03d}", agent=f"term-{i + 1:03d}", area="a-01", handlers=list(staff)
        )
        for i in range(TERMINALS)
    ]
    policy = SitePolicy(
        site=Site(name="bench registers (synthetic)"),
        people=persons,
        cards=cards,
        areas=areas,
        terminals=terminals,
        doors=doors,
        key_cabinets=cabinets,
    )
    return SiteShape(
        policy=policy,
        staff=staff,
        visitors=tuple(guests),
        rooms=tuple(d.id for d in doors if d.kind == "room"),
        lockers=tuple(d.id for d in doors if d.kind == "locker"),
        cabinets=tuple(c.door for c in cabinets),
        terminals=tuple(t.id for t in terminals),
        door_agents=door_agents,
        terminal_agents={t.id: t.agent for t in terminals},
        area_of=area_of,
        logins=logins,
    )


# --- generation ------------------------------------------------------------------------------------------


@dataclass(order=True)
class _Pending:
    at: datetime
    order: int
    agent: str = field(compare=False)
    type: str = field(compare=False)
    payload: dict[str, Any] = field(compare=False)


@dataclass(frozen=True, slots=True)
class Generated:
    """One generated event, in stored order, ready for the events table."""

    agent: str
    seq: int
    event_id: str
    type: str
    occurred_at: datetime
    payload: dict[str, Any]
    raw: str


@dataclass(frozen=True, slots=True)
class Unsigned:
    """One generated event with its seq and id drawn, not yet signed."""

    agent: str
    seq: int
    event_id: str
    type: str
    occurred_at: datetime
    payload: dict[str, Any]


def sign_event(key: Ed25519PrivateKey, u: Unsigned) -> Generated:
    """Return the event as its agent would send it: the canonical signed envelope."""
    body = {
        "v": PROTOCOL_VERSION,
        "agent": u.agent,
        "seq": u.seq,
        "id": u.event_id,
        "type": u.type,
        "at": timefmt.fmt(u.occurred_at),
        "clock": {"synced": True, "offset_ms": 0},
        "payload": u.payload,
    }
    raw = canonical_bytes({"event": body, "sig": signing.sign(key, "event", body)}).decode()
    return Generated(u.agent, u.seq, u.event_id, u.type, u.occurred_at, u.payload, raw)


class EventSource:
    """Policy-consistent synthetic activity (rooms, lockers, keys, logins, USB), in time order, signed."""

    def __init__(
        self,
        shape: SiteShape,
        keys: dict[str, Ed25519PrivateKey],
        *,
        end: datetime,
        days: int,
        total: int,
        seed: int = 12,
    ) -> None:
        """Generate total events (less the few follow-ups due after end) spread evenly over the days before end."""
        self.shape = shape
        self.keys = keys
        self.rng = random.Random(seed)
        self.end = end
        self.start = end - timedelta(days=days)
        self.total = total
        # One event per step; follow-ups due after the end (keys still out) are never emitted: a few short.
        self.step = (end - self.start) / max(total, 1)
        self.key_free_at: dict[tuple[str, int], datetime] = {}
        self.seqs: dict[str, int] = {}
        self.last = self.start
        self._heap: list[_Pending] = []
        self._order = 0

    def _push(self, at: datetime, agent: str, type_: str, payload: dict[str, Any]) -> None:
        self._order += 1
        heapq.heappush(self._heap, _Pending(at, self._order, agent, type_, payload))

    def _card(self, person: str) -> str:
        return f"****-{person[-4:]}"

    def _room(self, t: datetime) -> None:
        rng, s = self.rng, self.shape
        room = rng.choice(s.rooms)
        agent, area = s.door_agents[room], s.area_of[room]
        n = room[-2:]
        extra: dict[str, Any] = {}
        if s.visitors and rng.random() < 0.05:
            person = rng.choice(s.visitors)
            extra = {"visitor": True, "escort": rng.choice(s.staff)}
        else:
            person = rng.choice(s.staff)
        stay = timedelta(minutes=rng.randint(10, 240))
        for at, direction in ((t, "entry"), (t + stay, "exit")):
            grant = {
                "door": room,
                "person": person,
                "card_masked": self._card(person),
                "rule": f"doors.{room}.allowed",
                "direction": direction,
                "reader": f"rdr-{n}-{'in' if direction == 'entry' else 'out'}",
                "area": area,
                **extra,
            }
            self._push(at, agent, "door.access_granted", grant)
            self._push(at + timedelta(seconds=2), agent, "door.opened", {"door": room, "person": person})
            self._push(
                at + timedelta(seconds=7), agent, "door.closed", {"door": room, "open_seconds": 5, "person": person}
            )

    def _locker(self, t: datetime) -> None:
        rng, s = self.rng, self.shape
        locker, person = rng.choice(s.lockers), rng.choice(s.staff)
        agent = s.door_agents[locker]
        grant = {
            "door": locker,
            "person": person,
            "card_masked": self._card(person),
            "rule": f"doors.{locker}.allowed",
            "direction": "both",
        }
        self._push(t, agent, "door.access_granted", grant)
        self._push(t + timedelta(seconds=3), agent, "door.opened", {"door": locker, "person": person})
        open_s = rng.randint(5, 60)
        self._push(
            t + timedelta(seconds=3 + open_s),
            agent,
            "door.closed",
            {"door": locker, "open_seconds": open_s, "person": person},
        )

    def _key(self, t: datetime) -> None:
        rng, s = self.rng, self.shape
        cabinet = rng.choice(s.cabinets)
        free = [i for i in range(SLOTS_PER_CABINET) if self.key_free_at.get((cabinet, i), self.start) < t]
        if not free:
            self._denied(t)
            return
        slot, person = rng.choice(free), rng.choice(s.staff)
        agent, key = s.door_agents[cabinet], f"k-{cabinet[-2:]}-{slot + 1:02d}"
        rule = f"doors.{cabinet}.allowed"
        grant = {
            "door": cabinet,
            "person": person,
            "card_masked": self._card(person),
            "rule": rule,
            "direction": "both",
        }
        self._push(t, agent, "door.access_granted", grant)
        due = t + timedelta(hours=8)
        self._push(
            t + timedelta(seconds=5),
            agent,
            "key.taken",
            {"door": cabinet, "slot": slot, "key": key, "person": person, "due_at": timefmt.fmt(due)},
        )
        late = rng.random() < 0.05
        back = t + (timedelta(hours=rng.randint(9, 72)) if late else timedelta(minutes=rng.randint(20, 420)))
        self.key_free_at[(cabinet, slot)] = back + timedelta(seconds=10)
        returner = person if rng.random() < 0.9 else rng.choice(s.staff)
        self._push(
            back,
            agent,
            "key.returned",
            {"door": cabinet, "slot": slot, "key": key, "person": returner, "wrong_slot": returner != person},
        )

    def _login(self, t: datetime) -> None:
        rng, s = self.rng, self.shape
        terminal, person = rng.choice(s.terminals), rng.choice(s.staff)
        agent, user = s.terminal_agents[terminal], s.logins[person]
        self._push(
            t,
            agent,
            "login.granted",
            {
                "terminal": terminal,
                "person": person,
                "user": user,
                "methods": ["card"],
                "card_masked": self._card(person),
            },
        )
        locked = t + timedelta(minutes=rng.randint(20, 180))
        self._push(locked, agent, "session.locked", {"terminal": terminal, "user": user, "cause": "card_removed"})
        self._push(
            locked + timedelta(minutes=5),
            agent,
            "session.ended",
            {"terminal": terminal, "user": user, "cause": "card_absent"},
        )

    def _usb(self, t: datetime) -> None:
        rng, s = self.rng, self.shape
        terminal, person = rng.choice(s.terminals), rng.choice(s.staff)
        agent = s.terminal_agents[terminal]
        device = {
            "terminal": terminal,
            "vendor_product": "0781:5581",
            "device_hash": f"{rng.getrandbits(128):032x}",
            "person": person,
            "serial_masked": f"SN****{rng.randint(0, 9999):04d}",
        }
        self._push(t, agent, "usb.inserted", device)
        if rng.random() < 0.7:
            self._push(t + timedelta(milliseconds=40), agent, "usb.blocked", {**device, "reason": "not_registered"})
        else:
            self._push(t + timedelta(milliseconds=40), agent, "usb.allowed", {**device, "rule": "registered media"})

    def _denied(self, t: datetime) -> None:
        rng, s = self.rng, self.shape
        room, person = rng.choice(s.rooms), rng.choice(s.staff)
        self._push(
            t,
            s.door_agents[room],
            "door.access_denied",
            {"door": room, "reason": "outside_schedule", "person": person, "card_masked": self._card(person)},
        )

    def _unsigned(self, p: _Pending) -> Unsigned:
        # The seq and the event id are drawn here, in emission order, so the output does not depend on who signs.
        seq = self.seqs[p.agent] = self.seqs.get(p.agent, 0) + 1
        event_id = uuid.UUID(int=self.rng.getrandbits(128), version=4).hex
        return Unsigned(p.agent, seq, event_id, p.type, p.at, p.payload)

    def _sign(self, p: _Pending) -> Generated:
        return sign_event(self.keys[p.agent], self._unsigned(p))

    def __iter__(self) -> Iterator[Generated]:
        """Yield the events in time order, each with a distinct time (a millisecond after the one before)."""
        for u in self.unsigned():
            yield sign_event(self.keys[u.agent], u)

    def unsigned(self) -> Iterator[Unsigned]:
        """Yield the events in time order before signing (signing can then run in other processes)."""
        actions: list[tuple[Callable[[datetime], None], int]] = [
            (self._room, 30),
            (self._locker, 20),
            (self._key, 5),
            (self._login, 25),
            (self._usb, 15),
            (self._denied, 5),
        ]
        funcs = [a for a, _ in actions]
        weights = [w for _, w in actions]
        emitted = 0
        t = self.start
        one_ms = timedelta(milliseconds=1)
        while emitted < self.total and (self._heap or t < self.end):
            if t < self.end and (not self._heap or self._heap[0].at > t):
                pushed = self._order
                self.rng.choices(funcs, weights)[0](t)
                # Advance by the events this action will emit, so that the total spreads over the whole period.
                t += self.step * (self._order - pushed)
                continue
            p = heapq.heappop(self._heap)
            if p.at >= self.end:
                continue  # after the end of the period: never happened (keys still out, people still inside)
            p.at = p.at.replace(microsecond=(p.at.microsecond // 1000) * 1000)
            if p.at <= self.last:
                p.at = self.last + one_ms
            self.last = p.at
            emitted += 1
            yield self._unsigned(p)


# --- loading -----------------------------------------------------------------------------------------------


@dataclass
class Chains:
    """Per-agent chain state while loading: length, head hash, last seq."""

    length: dict[str, int] = field(default_factory=dict)
    head: dict[str, str] = field(default_factory=dict)
    seq: dict[str, int] = field(default_factory=dict)

    def row(self, g: Generated, event_pk: int) -> dict[str, Any]:
        """Return the events row of g with its chain columns, as ingest would have stored it."""
        index = self.length.get(g.agent, 0) + 1
        prev = self.head.get(g.agent, "0" * 64)
        received = g.occurred_at + timedelta(milliseconds=150)
        digest = record_hash(
            prev,
            agent=g.agent,
            seq=g.seq,
            chain_index=index,
            event_id=g.event_id,
            type=g.type,
            occurred_at=g.occurred_at,
            received_at=received,
            raw=g.raw,
            stored_at=received,
        )
        self.length[g.agent], self.head[g.agent], self.seq[g.agent] = index, digest, g.seq
        return {
            "id": event_pk,
            "agent_id": g.agent,
            "seq": g.seq,
            "event_id": g.event_id,
            "type": g.type,
            "occurred_at": g.occurred_at,
            "received_at": received,
            "stored_at": received,
            "clock_synced": True,
            "clock_offset_ms": 0,
            "payload": g.payload,
            "raw": g.raw,
            "chain_index": index,
            "prev_hash": prev,
            "hash": digest,
            **subject_columns(g.payload),
        }


# The events table as the store COPYs it, with the id first (the bench numbers its rows itself).
_COLUMNS = ("id", *EVENT_COLUMNS)


def insert_events(conn: Connection, rows: list[dict[str, Any]]) -> None:
    """Insert event rows in bulk: executemany on SQLite, COPY on PostgreSQL (as the store's ingest does)."""
    if conn.dialect.name != "postgresql":
        conn.execute(insert(EVENTS), rows)
        return
    driver = conn.connection.driver_connection
    assert driver is not None
    with driver.cursor() as cursor, cursor.copy(f"COPY events ({', '.join(_COLUMNS)}) FROM STDIN") as copy:
        for row in rows:
            copy.write_row([json.dumps(row[c]) if c == "payload" else row[c] for c in _COLUMNS])


def prepare_store(store: Store, shape: SiteShape, policy_key: Ed25519PrivateKey) -> dict[str, Ed25519PrivateKey]:
    """Apply the site policy and register one agent per door agent and terminal; return their signing keys."""
    PolicyService(store, policy_key).apply(shape.policy, source_sha256="0" * 64, created_by="bench registers")
    keys: dict[str, Ed25519PrivateKey] = {}
    for agent in shape.agents:
        keys[agent] = signing.generate_key()
        pem = signing.public_key_pem(keys[agent].public_key()).decode()
        store.register_agent(agent, pem, registered_at=datetime(2020, 1, 1, tzinfo=UTC))
    return keys


@dataclass(frozen=True)
class LoadResult:
    """What was loaded: events, the highest id, and seconds spent generating+signing vs writing."""

    events: int
    top_id: int
    generate_s: float
    write_s: float


def _seal(store: Store, chains: Chains) -> None:
    """Set the streams rows to the loaded chains' heads and seal them with one signed ingest checkpoint."""
    with write_transaction(store.engine) as conn:
        heads: dict[str, Any] = {}
        for agent, length in sorted(chains.length.items()):
            conn.execute(
                update(STREAMS)
                .where(STREAMS.c.agent_id == agent)
                .values(
                    chain_length=length,
                    head_hash=chains.head[agent],
                    max_seq=chains.seq[agent],
                    contiguous_seq=chains.seq[agent],
                )
            )
            heads[agent] = head_fields(length, chains.head[agent], chains.seq[agent], chains.seq[agent])
        lock_log(conn)
        append(conn, store.signing_key, INGEST, {"streams": heads}, timefmt.now())
    if store.engine.dialect.name == "postgresql":
        with store.engine.connect() as c2:
            c2.exec_driver_sql("SELECT setval(pg_get_serial_sequence('events', 'id'), (SELECT max(id) FROM events))")
            c2.commit()


def load_events(
    store: Store, source: Iterator[Generated], *, batch: int = 20_000, progress: Callable[[int], None] | None = None
) -> LoadResult:
    """Store the generated events with their chains, update the streams, and seal them with one checkpoint."""
    import time

    chains = Chains()
    with store.engine.connect() as conn:
        top = int(conn.execute(select(func.coalesce(func.max(EVENTS.c.id), 0))).scalar_one())
    count, gen_s, write_s = 0, 0.0, 0.0
    rows: list[dict[str, Any]] = []
    mark = time.perf_counter()
    for g in source:
        top += 1
        rows.append(chains.row(g, top))
        if len(rows) >= batch:
            gen_s += time.perf_counter() - mark
            mark = time.perf_counter()
            with store.engine.begin() as conn:
                insert_events(conn, rows)
            count += len(rows)
            rows = []
            write_s += time.perf_counter() - mark
            mark = time.perf_counter()
            if progress:
                progress(count)
    gen_s += time.perf_counter() - mark
    mark = time.perf_counter()
    if rows:
        with store.engine.begin() as conn:
            insert_events(conn, rows)
        count += len(rows)
    _seal(store, chains)
    write_s += time.perf_counter() - mark
    if progress:
        progress(count)
    return LoadResult(count, top, gen_s, write_s)


# --- parallel generate+sign: one worker process per share of the agents -----------------------------------

_WORKER: dict[str, Any] = {}


def _worker_start(keys: dict[str, bytes]) -> None:
    """Set up a signing worker: its agents' keys and their chain state (it alone extends these chains)."""
    _WORKER["keys"] = {agent: Ed25519PrivateKey.from_private_bytes(raw) for agent, raw in keys.items()}
    _WORKER["chains"] = Chains()


def _worker_rows(items: list[tuple[int, Unsigned]]) -> list[dict[str, Any]]:
    """Sign the worker's events and chain them, in the order given (each agent's chain is sequential)."""
    keys, chains = _WORKER["keys"], _WORKER["chains"]
    return [chains.row(sign_event(keys[u.agent], u), pk) for pk, u in items]


def _worker_chains() -> Chains:
    """Return the worker's chain state (the streams rows and the checkpoint name it)."""
    return cast(Chains, _WORKER["chains"])


def load_events_parallel(
    store: Store,
    source: EventSource,
    *,
    workers: int = 2,
    batch: int = 20_000,
    progress: Callable[[int], None] | None = None,
) -> LoadResult:
    """Like load_events, with signing and chaining in worker processes; the rows are byte-identical.

    The generator (one random stream: what happens, each event's seq and id) stays in this process, so the
    events are the same whatever the number of workers. Each agent belongs to one worker (its chain is a
    sequence: record n holds the hash of n - 1), which signs and chains that agent's events in order. While the
    workers sign one batch this process generates the next and writes the one before.
    """
    import multiprocessing
    import time
    from concurrent.futures import Future, ProcessPoolExecutor

    from cryptography.hazmat.primitives import serialization

    agents = sorted(source.keys)
    owner = {agent: i % workers for i, agent in enumerate(agents)}
    raw = serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    shares = [{a: source.keys[a].private_bytes(*raw) for a in agents if owner[a] == w} for w in range(workers)]
    context = multiprocessing.get_context("spawn")  # no fork of a process holding engines and threads
    pools = [
        ProcessPoolExecutor(1, mp_context=context, initializer=_worker_start, initargs=(share,)) for share in shares
    ]
    with store.engine.connect() as conn:
        top = int(conn.execute(select(func.coalesce(func.max(EVENTS.c.id), 0))).scalar_one())
    count, gen_s, write_s = 0, 0.0, 0.0

    def write(futures: list[Future[list[dict[str, Any]]]]) -> None:
        nonlocal count, write_s, gen_s
        mark = time.perf_counter()
        rows = sorted((row for f in futures for row in f.result()), key=lambda r: int(r["id"]))
        gen_s += time.perf_counter() - mark  # waiting for the signers counts as generating
        mark = time.perf_counter()
        with store.engine.begin() as conn:
            insert_events(conn, rows)
        count += len(rows)
        write_s += time.perf_counter() - mark
        if progress:
            progress(count)

    try:
        in_flight: list[Future[list[dict[str, Any]]]] | None = None
        parts: list[list[tuple[int, Unsigned]]] = [[] for _ in range(workers)]
        size = 0
        mark = time.perf_counter()
        for u in source.unsigned():
            top += 1
            parts[owner[u.agent]].append((top, u))
            size += 1
            if size >= batch:
                gen_s += time.perf_counter() - mark
                submitted = [pool.submit(_worker_rows, part) for pool, part in zip(pools, parts, strict=True)]
                if in_flight is not None:
                    write(in_flight)
                in_flight, parts, size = submitted, [[] for _ in range(workers)], 0
                mark = time.perf_counter()
        gen_s += time.perf_counter() - mark
        last = [pool.submit(_worker_rows, part) for pool, part in zip(pools, parts, strict=True)]
        if in_flight is not None:
            write(in_flight)
        write(last)
        chains = Chains()
        for pool in pools:
            share = pool.submit(_worker_chains).result()
            chains.length.update(share.length)
            chains.head.update(share.head)
            chains.seq.update(share.seq)
    finally:
        for pool in pools:
            pool.shutdown(cancel_futures=True)
    mark = time.perf_counter()
    _seal(store, chains)
    write_s += time.perf_counter() - mark
    return LoadResult(count, top, gen_s, write_s)


def ensure_streams(store: Store, agents: list[str]) -> None:
    """Create the streams rows of the agents (ingest makes them on an agent's first batch)."""
    with store.engine.begin() as conn:
        have = set(conn.execute(select(STREAMS.c.agent_id)).scalars())
        missing = [
            {"agent_id": a, "chain_length": 0, "head_hash": "0" * 64, "max_seq": 0, "contiguous_seq": 0}
            for a in agents
            if a not in have
        ]
        if missing:
            conn.execute(insert(STREAMS), missing)


# --- projection --------------------------------------------------------------------------------------------


def project(store: Store, *, batch: int = 20_000, progress: Callable[[int], None] | None = None) -> int:
    """Fill the door registers from every stored event (see the module docstring); return the events applied."""
    projector = DoorProjector(store)
    site = projector.site()
    applied = 0
    position = 0
    e = EVENTS.c
    types = sorted(door_apply.PROJECTED_TYPES)
    log_table = door_apply._LOG
    while True:
        with write_transaction(store.engine) as conn:
            stmt = (
                select(e.id, e.agent_id, e.seq, e.event_id, e.type, e.occurred_at, e.payload)
                .where(e.id > position, e.type.in_(types))
                .order_by(e.id)
                .limit(batch)
            )
            found = [door_apply.StoredEvent(*row) for row in conn.execute(stmt)]
            log_rows: list[dict[str, Any]] = []
            for ev in found:
                schema = EVENT_TYPES[ev.type]
                payload = schema.model_validate(ev.payload)
                if isinstance(payload, door_apply.LogPayload):
                    log_rows.append(_log_row(site, ev, payload))
                    if isinstance(payload, DoorAccessGranted):
                        door_apply._movement(conn, site, ev, payload)
                else:
                    door_apply.apply_event(conn, site, ev)  # key.taken / key.returned: the projection's own code
            if log_rows:
                conn.execute(insert(log_table), log_rows)
            if found:
                position = found[-1].id
            applied += len(found)
            if len(found) < batch:
                top = conn.execute(select(func.coalesce(func.max(e.id), 0))).scalar_one()
                conn.execute(
                    update(CURSORS).where(CURSORS.c.name == CURSOR).values(position=top, updated_at=timefmt.now())
                )
                break
        if progress:
            progress(applied)
    if progress:
        progress(applied)
    return applied


def _log_row(site: door_apply.SiteView, ev: door_apply.StoredEvent, p: Any) -> dict[str, Any]:
    """Return the door_log row the projection writes for ev (the projection's own function)."""
    return door_apply.log_row(site, ev, p)


def register_rows(engine: Engine) -> dict[str, list[tuple[Any, ...]]]:
    """Return every row of the door registers, sorted, for a comparison."""
    out: dict[str, list[tuple[Any, ...]]] = {}
    with engine.connect() as conn:
        for table in REGISTER_TABLES:
            rows = [
                tuple(json.dumps(v, sort_keys=True) if isinstance(v, list) else v for v in r)
                for r in conn.execute(select(table))
            ]
            out[table.name] = sorted(rows, key=repr)
    return out


def projection_matches(store: Store) -> tuple[bool, dict[str, int]]:
    """Rebuild the registers with DoorProjector.rebuild() and tell whether every table came out the same."""
    before = register_rows(store.engine)
    DoorProjector(store, batch=5000).rebuild()
    after = register_rows(store.engine)
    return before == after, {name: len(rows) for name, rows in after.items()}
