"""``python -m sekisho.agents.sim.doors --config agent.toml``: the demo's door agent, driven by the firmware stubs.

Everything below the people is real: one OSDP reader stub (libosdp peripheral, Secure Channel with its
own key) per reader of the policy on its own pseudo-terminal, the locker board stub on another, the real
drivers, the real door agent deciding from the signed policy and recording every event. The people are
scripted: they enter and leave the controlled room, open lockers, borrow and return keys, bring an escorted
visitor, need a second person for the safe locker — and sometimes use a lost card or hold a door.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import random
import signal
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from sekisho.agents.doors.attach import AttachedDoors, attach_doors
from sekisho.agents.runtime.agent import Agent
from sekisho.agents.runtime.config import load_config
from sekisho.agents.sim.login_traffic import DEMO_SITE_KEY
from sekisho.agents.sim.traffic import DEMO_CARD_UIDS
from sekisho.drivers.smartcard import hash_uid
from sekisho.protocol.policy import Door, SitePolicy

log = logging.getLogger(__name__)


def demo_scbk(reader_id: str) -> bytes:
    """Return a demo reader's Secure Channel key, derived from its name (demo only: anyone can derive it)."""
    return hashlib.sha256(b"sekisho-demo-scbk:" + reader_id.encode()).digest()[:16]


class DoorSite:
    """The stubs, the drivers and the door agent of one demo door box, plus the people's moves."""

    def __init__(self, agent: Agent, policy: SitePolicy, stop: threading.Event) -> None:
        from sekisho.drivers.locker import LockerBoardLink
        from sekisho.drivers.osdp import OsdpReaderLink, ReaderConfig
        from sekisho.firmware_stubs.locker_board import StubBoardProcess
        from sekisho.firmware_stubs.osdp_reader import StubReaderProcess

        self.agent = agent
        self.policy = policy
        self.stop = stop
        self.doors = {d.id: d for d in policy.doors}
        slots = max((s.index + 1 for c in policy.key_cabinets for s in c.slots), default=0)
        relays = max((d.relay + 1 for d in policy.doors), default=1)
        sensors = max(((d.sensor or 0) + 1 for d in policy.doors), default=1)
        self.board = StubBoardProcess(relays=relays, doors=sensors, key_slots=slots)
        self.readers: dict[str, StubReaderProcess] = {}
        links = []
        for door in policy.doors:
            for reader in door.readers:
                stub = StubReaderProcess(address=1, scbk=demo_scbk(reader.id))
                self.readers[reader.id] = stub
                links.append(
                    OsdpReaderLink(
                        stub.master_fd, [ReaderConfig(reader_id=reader.id, address=1, scbk=demo_scbk(reader.id))]
                    )
                )
        self.cards = {
            card.person: uid.encode()
            for uid in DEMO_CARD_UIDS
            for card in policy.cards
            if card.uid_hash == hash_uid(uid.encode(), DEMO_SITE_KEY)
        }
        self.attached: AttachedDoors = attach_doors(
            emit=agent.emit,
            policy=agent.policy,
            state_dir=agent.config.state_dir,
            readers=links,
            board=LockerBoardLink(self.board.host, relays=relays, doors=sensors, key_slots=slots),
            site_key=DEMO_SITE_KEY,
            commands=agent.commands,
        )

    def close(self) -> None:
        """Stop the door agent's drivers and the stubs."""
        self.attached.stop()
        for stub in self.readers.values():
            stub.close()
        self.board.close()

    # --- the people ------------------------------------------------------------------------------

    def _pause(self, low: float, high: float) -> bool:
        return self.stop.wait(random.uniform(low, high))

    def _released(self, door: Door, timeout: float = 2.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.attached.core.door_states().get(door.id)
            if state is not None and state[0] == "unlocked":
                return True
            if self.stop.wait(0.05):
                return False
        return False

    def tap(self, person: str, reader: str) -> None:
        """The person holds their card to the reader (a stranger's card if they have none)."""
        card = self.cards.get(person, b"DEMO-STRANGER-01")
        self.readers[reader].present_card(card, bits=len(card) * 8)

    def _through(self, door: Door, hold_s: float = 1.0) -> None:
        if door.sensor is None:
            return
        self.board.open_door(door.sensor)
        if not self._pause(hold_s * 0.5, hold_s):
            self.board.close_door(door.sensor)

    def enter_or_leave(self, person: str, direction: str) -> None:
        """Through the controlled room's entry or exit reader."""
        for door in self.doors.values():
            reader = next((r.id for r in door.readers if r.direction == direction), None)
            if door.kind == "room" and reader is not None:
                self.tap(person, reader)
                if self._released(door):
                    self._through(door)
                return

    def escorted_visit(self, visitor: str, escort: str) -> None:
        """A visitor's card opens the room only together with an escort's (both in the event)."""
        for door in self.doors.values():
            reader = next((r.id for r in door.readers if r.direction == "entry"), None)
            if door.kind == "room" and reader is not None:
                self.tap(visitor, reader)
                if self._pause(0.5, 1.5):
                    return
                self.tap(escort, reader)
                if self._released(door):
                    self._through(door, 2.0)
                return

    def locker(self, door: Door, people: list[str]) -> None:
        """One person (or two, for a two-person locker) opens a locker and closes it again."""
        for person in people:
            self.tap(person, door.readers[0].id)
            if self._pause(0.3, 1.0):
                return
        if self._released(door):
            self._through(door, 2.0)

    def key_loan(self, person: str, slot: int, taking: bool) -> None:
        """Take a key from (or return it to) the cabinet after a grant."""
        cabinet = next((d for d in self.doors.values() if d.kind == "key_cabinet"), None)
        if cabinet is None or cabinet.sensor is None:
            return
        self.tap(person, cabinet.readers[0].id)
        if not self._released(cabinet):
            return
        self.board.open_door(cabinet.sensor)
        if self._pause(0.3, 0.8):
            return
        (self.board.take_key if taking else self.board.return_key)(slot)
        if not self._pause(0.3, 0.8):
            self.board.close_door(cabinet.sensor)


def _scenario(site: DoorSite, rng: random.Random) -> list[Callable[[], None]]:
    policy = site.policy
    by_kind = {kind: [d for d in policy.doors if d.kind == kind] for kind in ("room", "locker", "key_cabinet")}
    staff = [p.id for p in policy.people if "visitor" not in p.roles and p.id in site.cards]
    visitors = [p.id for p in policy.people if "visitor" in p.roles]
    steps: list[Callable[[], None]] = []
    inside: set[str] = set()

    def room(person: str) -> Callable[[], None]:
        def move() -> None:
            direction = "exit" if person in inside else "entry"
            site.enter_or_leave(person, direction)
            (inside.discard if direction == "exit" else inside.add)(person)

        return move

    for person in staff:
        steps.append(room(person))
    for visitor in visitors if staff else []:
        steps.append(partial(site.escorted_visit, visitor, staff[0]))
    for door in by_kind["locker"]:
        allowed = [p for p in door.allowed if p in site.cards]
        if door.two_person and len(allowed) >= 2:
            steps.append(partial(site.locker, door, allowed[:2]))
        elif allowed:
            steps.append(partial(site.locker, door, [rng.choice(allowed)]))
        # Someone with a lost or foreign card: refused, with the reason.
        steps.append(partial(site.locker, door, [rng.choice([p.id for p in policy.people])]))
    # Keys first: a loan opens the key-lending register early in a short demo; the returns come last.
    takes: list[Callable[[], None]] = []
    returns: list[Callable[[], None]] = []
    for cabinet in policy.key_cabinets:
        door = site.doors[cabinet.door]
        for slot in cabinet.slots:
            holders = [p for p in (slot.allowed or door.allowed) if p in site.cards]
            if holders:
                takes.append(partial(site.key_loan, holders[-1], slot.index, taking=True))
                returns.append(partial(site.key_loan, holders[-1], slot.index, taking=False))
    steps = takes[:1] + steps + takes[1:] + returns
    return steps


def run(agent: Agent, stop: threading.Event, interval: float) -> None:
    """Wait for a policy with doors, bring up the stubs and the door agent, then let people move."""
    while not stop.is_set():
        bundle = agent.policy.in_force()
        if bundle is not None:
            policy = SitePolicy.model_validate(bundle.bundle.policy)
            if policy.doors:
                break
        stop.wait(0.5)
    else:
        return
    site = DoorSite(agent, policy, stop)
    site.attached.start()
    rng = random.Random()
    try:
        steps = _scenario(site, rng)
        while steps and not stop.is_set():
            for step in steps:
                if stop.is_set():
                    return
                try:
                    step()
                except Exception:  # a stub hiccup must not end the demo
                    log.exception("demo door step failed")
                stop.wait(rng.expovariate(1 / interval))
    finally:
        site.close()


def main() -> None:
    """Run the demo door agent until SIGINT/SIGTERM."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--interval", type=float, default=2.0, help="mean seconds between people's moves")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    agent = Agent(load_config(args.config))
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    agent.start()
    try:
        run(agent, stop, args.interval)
    finally:
        agent.stop()


if __name__ == "__main__":
    main()
