"""The USB guard end to end: fake sysfs tree, injected hot-plug, a real Agent's outbox and a real PolicyCache."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from sekisho.agents.runtime.agent import Agent
from sekisho.agents.runtime.config import AgentConfig
from sekisho.agents.usb.guard import UsbGuard, site_ruleset
from sekisho.agents.usb.session import StaticSession
from sekisho.deploy.pki import AgentCredentials, PkiPaths
from sekisho.drivers.usb.blockdev import FakeBlockDevices
from sekisho.drivers.usb.events import InjectedHotplug
from sekisho.drivers.usb.fake import FakeSysfsTree
from sekisho.drivers.usb.sysfs import SysfsUsb
from sekisho.protocol import events, messages, signing, timefmt
from sekisho.protocol.policy import MediaLoan, Medium, Person, Site, SitePolicy, Terminal

AGENT = "agent-a"
TERMINAL = "t-hr-01"
STICK_SERIAL = "4C530001230000123456"
MEDIUM_SERIAL = "SEKISHO-MEDIUM-0001"
MEDIUM_SHA = hashlib.sha256(MEDIUM_SERIAL.encode()).hexdigest()
STORAGE = (0x08, 0x06, 0x50)
KEYBOARD = (0x03, 0x01, 0x01)


def make_agent(pki: Path, state: Path) -> Agent:
    creds = AgentCredentials.at(pki, AGENT)
    return Agent(
        AgentConfig(
            agent_id=AGENT,
            ca_cert=creds.ca_cert,
            tls_cert=creds.tls_cert,
            tls_key=creds.tls_key,
            signing_key=creds.signing_key,
            controller_public_key=creds.controller_signing_pub,
            state_dir=state,
        )
    )


def loan(**overrides: Any) -> MediaLoan:
    now = timefmt.now()
    values: dict[str, Any] = dict(
        id="loan-1",
        medium="m-001",
        person="alice",
        terminals=[TERMINAL],
        starts_at=now - timedelta(hours=1),
        ends_at=now + timedelta(hours=2),
        purpose="year-end tax forms",
        read_only=True,
        approved_by="mgr",
    )
    values.update(overrides)
    return MediaLoan(**values)


def site_policy(loans: list[MediaLoan], *, medium_status: str = "active", device_hash: str | None = None) -> dict:
    people = [Person(id=p, name=p.title()) for p in ("alice", "bob", "mgr")]
    terminals = [Terminal(id=t, name=t, agent=AGENT, handlers=["alice", "bob"]) for t in (TERMINAL, "t-hr-02")]
    medium = Medium(
        id="m-001",
        name="USB memory 1",
        serial_sha256=MEDIUM_SHA,
        department="HR",
        status=medium_status,
        device_hash=device_hash,
    )  # type: ignore[arg-type]
    policy = SitePolicy(site=Site(name="Test"), people=people, terminals=terminals, media=[medium], loans=loans)
    return policy.model_dump(mode="json")


@dataclass
class Rig:
    """Everything one test drives: tree, hot-plug, session, block devices, agent, guard."""

    tree: FakeSysfsTree
    sysfs: SysfsUsb
    hotplug: InjectedHotplug
    session: StaticSession
    blocks: FakeBlockDevices
    agent: Agent
    ctl_key: Any
    guard: UsbGuard
    clock: list[datetime]
    version: int = 0

    def offer(self, policy: dict) -> None:
        self.version += 1
        raw = messages.build_bundle(
            self.ctl_key, agent=AGENT, version=self.version, policy=policy, lifetime=timedelta(hours=12)
        )
        assert self.agent.policy.offer(raw).accepted

    def authorized(self, sys_name: str) -> str:
        return self.tree.read_attribute(sys_name, "authorized")

    def usb_events(self) -> list[tuple[str, dict[str, Any]]]:
        decoded = [events.decode_event(raw) for _, raw in self.agent.outbox.pending(0, 10_000)]
        return [(e.type, e.payload) for e in decoded if e.type.startswith("usb.")]

    def last(self, type_: str) -> dict[str, Any]:
        return [p for t, p in self.usb_events() if t == type_][-1]

    def plug_keyboard(self, sys_name: str = "1-1") -> None:
        self.tree.add_device(sys_name, 0x046D, 0xC31C, interfaces=[KEYBOARD], authorized=False)
        self.hotplug.inject_add(sys_name)

    def plug_stick(self, sys_name: str = "1-2") -> None:
        self.tree.add_device(sys_name, 0x0781, 0x5581, serial=STICK_SERIAL, interfaces=[STORAGE], authorized=False)
        self.hotplug.inject_add(sys_name)

    def plug_medium(self, sys_name: str = "1-4", *, disk: bool = True) -> None:
        self.tree.add_device(sys_name, 0x0951, 0x1666, serial=MEDIUM_SERIAL, interfaces=[STORAGE], authorized=False)
        self.hotplug.inject_add(sys_name)
        if disk and self.authorized(sys_name) == "1":
            # What the kernel does once the device is authorised: usb-storage binds, a disk appears.
            self.blocks.add_disk(sys_name, "sdb")
            self.guard.on_block_device(sys_name, "sdb")


@pytest.fixture
def make_rig(pki: Path, tmp_path: Path) -> Iterator[Callable[..., Rig]]:
    agents: list[Agent] = []
    guards: list[UsbGuard] = []

    def make(*, start: bool = True, rules: str | None = None, person: str | None = "alice") -> Rig:
        tree = FakeSysfsTree(tmp_path / "sys")
        if not (tree.root / "usb1").exists():
            tree.add_root_hub(1)
        sysfs = SysfsUsb(tree.root)
        hotplug = InjectedHotplug(sysfs)
        session = StaticSession(person)
        blocks = FakeBlockDevices(tree.root)
        agent = make_agent(pki, tmp_path / "state")
        agents.append(agent)
        ctl_key = signing.load_private_key(PkiPaths.at(pki).controller_signing_key)
        clock = [timefmt.now()]
        guard = UsbGuard(
            agent.emit_many,
            agent.policy,
            sysfs,
            hotplug,
            session,
            TERMINAL,
            blocks,
            rules=site_ruleset(rules),
            now=lambda: clock[0],
        )
        guards.append(guard)
        rig = Rig(tree, sysfs, hotplug, session, blocks, agent, ctl_key, guard, clock)
        if start:
            guard.start()
        return rig

    yield make
    for guard in guards:
        guard.stop()
    for agent in agents:
        agent.stop()


@pytest.fixture
def rig(make_rig: Callable[..., Rig]) -> Rig:
    r = make_rig()
    r.offer(site_policy([loan()]))
    return r


def test_keyboard_allowed_stick_blocked_badusb_rejected(rig: Rig) -> None:
    rig.plug_keyboard("1-1")
    rig.plug_stick("1-2")
    rig.tree.add_device("1-3", 0x1234, 0x5678, serial="BADUSB99", interfaces=[STORAGE, KEYBOARD], authorized=False)
    rig.hotplug.inject_add("1-3")

    assert (rig.authorized("1-1"), rig.authorized("1-2"), rig.authorized("1-3")) == ("1", "0", "0")
    types = [t for t, _ in rig.usb_events()]
    assert types == ["usb.inserted", "usb.allowed", "usb.inserted", "usb.blocked", "usb.inserted", "usb.rejected"]
    allowed = rig.last("usb.allowed")
    assert allowed["vendor_product"] == "046d:c31c" and allowed["terminal"] == TERMINAL
    blocked = rig.last("usb.blocked")
    assert blocked["serial_masked"] == "***3456" and blocked["rule"].startswith("block with-interface")
    assert "BadUSB" in rig.last("usb.rejected")["reason"]
    assert rig.guard.decisions() == {"1-1": "allowed", "1-2": "blocked", "1-3": "rejected"}


def test_event_is_on_disk_before_authorized_is_written(rig: Rig) -> None:
    seen: list[tuple[str, str]] = []
    original = rig.sysfs.authorize

    def authorize(sys_name: str) -> None:
        seen.append((rig.usb_events()[-1][0], rig.authorized(sys_name)))
        original(sys_name)

    rig.sysfs.authorize = authorize  # type: ignore[method-assign]
    rig.plug_keyboard()
    assert seen == [("usb.allowed", "0")]


def test_devices_present_at_start_are_judged(make_rig: Callable[..., Rig], tmp_path: Path) -> None:
    tree = FakeSysfsTree(tmp_path / "sys")
    tree.add_root_hub(1)
    tree.add_device("1-1", 0x046D, 0xC31C, interfaces=[KEYBOARD])
    tree.add_device("1-2", 0x0781, 0x5581, serial=STICK_SERIAL, interfaces=[STORAGE])
    rig = make_rig()
    assert rig.tree.read_attribute("usb1", "authorized_default") == "0"
    assert (rig.authorized("1-1"), rig.authorized("1-2")) == ("1", "0")
    inserted = [p for t, p in rig.usb_events() if t == "usb.inserted"]
    assert [(p["sys_name"], p["trigger"]) for p in inserted] == [("1-1", "start"), ("1-2", "start")]
    # With no policy yet, the start-time judgement was fail-closed.
    assert rig.last("usb.blocked")["reason"].startswith("no valid policy")


def test_unreadable_device_is_blocked(rig: Rig) -> None:
    rig.tree.add_device("1-5", 0x0781, 0x5581, interfaces=[STORAGE], authorized=True)
    rig.tree.write_attribute("1-5", "idVendor", "zz\n")
    rig.hotplug.inject_add("1-5")
    assert rig.authorized("1-5") == "0"
    event = rig.last("usb.unreadable")
    assert event["sys_name"] == "1-5" and "unreadable" in event["reason"]
    rig.hotplug.inject_remove("1-5")
    assert rig.last("usb.removed")["was"] == "unreadable"


def test_no_policy_fails_closed(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig()
    rig.plug_keyboard()
    rig.plug_medium()
    assert (rig.authorized("1-1"), rig.authorized("1-4")) == ("1", "0")
    blocked = rig.last("usb.blocked")
    assert blocked["reason"].startswith("no valid policy (fail closed)") and blocked.get("medium") is None


def test_unusable_site_policy_fails_closed(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig()
    rig.offer({"doors": ["d1"]})
    rig.plug_medium()
    assert rig.authorized("1-4") == "0"
    assert rig.last("usb.blocked")["reason"].startswith("no valid policy")


def test_admin_rule_allows_a_device_the_default_blocks(make_rig: Callable[..., Rig]) -> None:
    # A gaming keyboard with a vendor-specific interface: blocked by default, allowed by a pinned rule.
    rig = make_rig(rules="allow id 1532:0227 with-interface equals { 03:01:01 ff:00:00 }\n")
    rig.offer(site_policy([]))
    rig.tree.add_device("1-2", 0x1532, 0x0227, interfaces=[KEYBOARD, (0xFF, 0, 0)], authorized=False)
    rig.hotplug.inject_add("1-2")
    assert rig.authorized("1-2") == "1"
    assert rig.last("usb.allowed")["rule"] == "allow id 1532:0227 with-interface { 03:01:01 ff:00:00 }"


@pytest.mark.parametrize(
    "rules",
    [
        "allow with-interface equals { 08:*:* }\n",  # usbguard-rules.conf(5)'s own example
        "allow id 0781:5581 with-interface 08:06:50\n",
        "allow\n",
    ],
)
def test_admin_rules_do_not_outrank_the_media_register(make_rig: Callable[..., Rig], rules: str) -> None:
    # Issue 15: an imported allow rule made any unregistered stick usable on a My Number terminal.
    rig = make_rig(rules=rules)
    rig.offer(site_policy([loan()]))
    rig.plug_stick("1-2")
    assert rig.authorized("1-2") == "0"
    blocked = rig.last("usb.blocked")
    assert blocked["reason"].startswith("not_registered: mass storage outside the media register")
    assert blocked["rule"] == rules.strip().replace("equals { 08:*:* }", "08:*:*")
    # The register still decides for registered media: lent to alice here, so allowed.
    rig.plug_medium("1-4")
    assert rig.authorized("1-4") == "1" and rig.last("usb.allowed")["rule"] == "media-loan"
    # And a keyboard is still allowed by the same rules.
    rig.plug_keyboard("1-3")
    assert rig.authorized("1-3") == "1"


def test_registered_medium_without_a_loan_for_this_person_stays_out_whatever_the_rules(
    make_rig: Callable[..., Rig],
) -> None:
    rig = make_rig(rules="allow with-interface equals { 08:*:* }\n", person="bob")
    rig.offer(site_policy([loan()]))
    rig.plug_medium("1-4")
    assert rig.authorized("1-4") == "0" and rig.last("usb.blocked")["reason"] == "wrong_person"


def test_lent_medium_allowed_read_only_for_its_borrower(rig: Rig) -> None:
    rig.plug_medium()
    assert rig.authorized("1-4") == "1"
    allowed = rig.last("usb.allowed")
    assert (allowed["medium"], allowed["loan"], allowed["person"], allowed["read_only"]) == (
        "m-001",
        "loan-1",
        "alice",
        True,
    )
    assert allowed["serial_sha256"] == MEDIUM_SHA and MEDIUM_SERIAL not in str(rig.usb_events())
    applied = rig.last("usb.readonly_applied")
    assert (applied["block_device"], applied["loan"]) == ("sdb", "loan-1")
    assert rig.blocks.is_read_only(rig.blocks.block_devices("1-4")[0])
    assert rig.blocks.applied == ["sdb"]


def test_read_write_loan_leaves_disk_writable(rig: Rig) -> None:
    rig.offer(site_policy([loan(read_only=False)]))
    rig.plug_medium()
    assert rig.authorized("1-4") == "1" and rig.blocks.applied == []


def udev_rule(rig: Rig, sys_name: str, disk: str = "sdb") -> None:
    """What deploy/udev/90-sekisho-usb-ro.rules does as the disk appears: read-only unless this plug is granted."""
    plug = " ".join(rig.tree.read_attribute(sys_name, name) for name in ("busnum", "devnum"))
    if rig.blocks.granted().get(sys_name) != plug:
        for block in rig.blocks.block_devices(sys_name):
            if block.name.startswith(disk):
                (block.sysfs_dir / "ro").write_text("1\n")


def plug_medium_under_the_rule(rig: Rig, sys_name: str = "1-4") -> None:
    rig.tree.add_device(sys_name, 0x0951, 0x1666, serial=MEDIUM_SERIAL, interfaces=[STORAGE], authorized=False)
    rig.hotplug.inject_add(sys_name)
    if rig.authorized(sys_name) == "1":
        rig.blocks.add_disk(sys_name, "sdb", partitions=1)
        udev_rule(rig, sys_name)
        rig.guard.on_block_device(sys_name, "sdb")


def test_read_write_loan_grants_the_plug_before_authorizing(rig: Rig) -> None:
    rig.offer(site_policy([loan(read_only=False)]))
    seen: list[dict[str, str]] = []
    original = rig.sysfs.authorize

    def authorize(sys_name: str) -> None:
        seen.append(rig.blocks.granted())
        original(sys_name)

    rig.sysfs.authorize = authorize  # type: ignore[method-assign]
    plug_medium_under_the_rule(rig)
    plug = f"1 {rig.tree.read_attribute('1-4', 'devnum')}"
    # The grant names bus and device number, and was there when `authorized` was written.
    assert seen == [{"1-4": plug}]
    # So the udev rule left the disk writable: nothing to lift, nothing set read-only.
    assert [rig.blocks.is_read_only(b) for b in rig.blocks.block_devices("1-4")] == [False, False]
    assert rig.blocks.applied == [] and rig.blocks.lifted == []
    assert rig.last("usb.allowed")["read_only"] is False


def test_read_only_loan_grants_nothing_and_the_rule_keeps_it_read_only(rig: Rig) -> None:
    plug_medium_under_the_rule(rig)
    assert rig.authorized("1-4") == "1" and rig.blocks.granted() == {}
    assert all(rig.blocks.is_read_only(b) for b in rig.blocks.block_devices("1-4"))
    assert rig.blocks.lifted == []


def test_grant_withdrawn_when_the_loan_ends_and_on_removal(rig: Rig) -> None:
    rig.offer(site_policy([loan(read_only=False)]))
    plug_medium_under_the_rule(rig)
    assert "1-4" in rig.blocks.granted()
    rig.offer(site_policy([]))
    assert rig.authorized("1-4") == "0" and rig.blocks.granted() == {}
    rig.offer(site_policy([loan(read_only=False)]))
    assert rig.authorized("1-4") == "1" and "1-4" in rig.blocks.granted()
    rig.tree.remove_device("1-4")
    rig.hotplug.inject_remove("1-4")
    assert rig.blocks.granted() == {}


def test_disk_made_read_only_by_the_rule_is_lifted_for_a_read_write_loan(rig: Rig) -> None:
    # The grant could not be written (or the agent restarted): the rule made the disk read-only.
    rig.offer(site_policy([loan(read_only=False)]))
    rig.blocks.grant_dir.parent.joinpath("not-a-dir").write_text("")
    rig.blocks.grant_dir = rig.blocks.grant_dir.parent / "not-a-dir" / "grants"
    plug_medium_under_the_rule(rig)
    assert rig.authorized("1-4") == "1"
    assert rig.blocks.lifted == ["sdb", "sdb1"]
    assert not any(rig.blocks.is_read_only(b) for b in rig.blocks.block_devices("1-4"))


def test_write_protected_medium_stays_read_only_and_is_not_retried(rig: Rig) -> None:
    rig.offer(site_policy([loan(read_only=False)]))
    rig.blocks.write_protected.update({"sdb", "sdb1"})
    rig.tree.add_device("1-4", 0x0951, 0x1666, serial=MEDIUM_SERIAL, interfaces=[STORAGE], authorized=True)
    rig.blocks.add_disk("1-4", "sdb", partitions=1)
    for block in rig.blocks.block_devices("1-4"):
        (block.sysfs_dir / "ro").write_text("1\n")
    calls: list[str] = []
    original = rig.blocks.set_read_write

    def counting(device: Any) -> bool:
        calls.append(device.name)
        return original(device)

    rig.blocks.set_read_write = counting  # type: ignore[method-assign]
    rig.hotplug.inject_add("1-4")
    rig.guard.sweep()
    rig.guard.sweep()
    assert rig.authorized("1-4") == "1" and calls == ["sdb", "sdb1"]


def test_loan_turning_read_only_withdraws_the_grant_and_protects(rig: Rig) -> None:
    rig.offer(site_policy([loan(read_only=False)]))
    plug_medium_under_the_rule(rig)
    rig.offer(site_policy([loan(read_only=True)]))
    assert rig.blocks.granted() == {} and rig.blocks.applied == ["sdb", "sdb1"]
    assert rig.last("usb.readonly_applied")["trigger"] == "policy"


def test_loan_turning_read_write_grants_and_lifts(rig: Rig) -> None:
    plug_medium_under_the_rule(rig)
    rig.offer(site_policy([loan(read_only=False)]))
    assert "1-4" in rig.blocks.granted() and rig.blocks.lifted == ["sdb", "sdb1"]
    assert rig.last("usb.allowed")["read_only"] is False
    rig.blocks.write_sectors(rig.blocks.block_devices("1-4")[0], 8)
    rig.guard.sweep()  # writes are what a read-write loan is for
    assert rig.authorized("1-4") == "1"


def test_start_withdraws_grants_left_by_an_earlier_run(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(start=False)
    rig.blocks.grant_dir.mkdir()
    (rig.blocks.grant_dir / "1-4").write_text("1 9\n")
    rig.guard.start()
    assert rig.blocks.granted() == {}


def test_disk_present_before_the_guard_sees_it_is_protected_at_once(rig: Rig) -> None:
    # Authorised by the kernel before the guard looked (e.g. a missed event): the disk is already there.
    rig.tree.add_device("1-4", 0x0951, 0x1666, serial=MEDIUM_SERIAL, interfaces=[STORAGE], authorized=True)
    rig.blocks.add_disk("1-4", "sdc", partitions=1)
    rig.hotplug.inject_add("1-4")
    assert rig.blocks.applied == ["sdc", "sdc1"]


@pytest.mark.parametrize(
    ("loans", "person", "reason", "kw"),
    [
        ([loan()], "bob", "wrong_person", {}),
        ([loan()], None, "no_session", {}),
        (
            [loan(starts_at=timefmt.now() - timedelta(days=2), ends_at=timefmt.now() - timedelta(days=1))],
            "alice",
            "loan_expired",
            {},
        ),
        (
            [loan(starts_at=timefmt.now() + timedelta(days=1), ends_at=timefmt.now() + timedelta(days=2))],
            "alice",
            "loan_not_started",
            {},
        ),
        ([loan(terminals=["t-hr-02"])], "alice", "wrong_terminal", {}),
        ([loan(returned_at=timefmt.now() - timedelta(minutes=5))], "alice", "loan_returned", {}),
        ([], "alice", "no_active_loan", {}),
        ([loan()], "alice", "medium_not_active", {"medium_status": "lost"}),
        ([loan()], "alice", "medium_hash_mismatch", {"device_hash": "A" * 43 + "="}),
    ],
    ids=[
        "wrong-person",
        "no-session",
        "expired",
        "not-started",
        "wrong-terminal",
        "returned",
        "no-loan",
        "lost-medium",
        "hash-mismatch",
    ],
)
def test_medium_blocked_with_precise_reason(make_rig: Callable[..., Rig], loans, person, reason, kw) -> None:
    rig = make_rig(person=person)
    rig.offer(site_policy(loans, **kw))
    rig.plug_medium()
    assert rig.authorized("1-4") == "0"
    blocked = rig.last("usb.blocked")
    assert (blocked["reason"], blocked["medium"], blocked["rule"]) == (reason, "m-001", "media-loan")
    assert rig.blocks.applied == []


def test_medium_with_extra_interface_is_not_the_medium(rig: Rig) -> None:
    rig.tree.add_device(
        "1-4", 0x0951, 0x1666, serial=MEDIUM_SERIAL, interfaces=[STORAGE, (0x02, 0x06, 0x00)], authorized=False
    )
    rig.hotplug.inject_add("1-4")
    assert rig.authorized("1-4") == "0" and rig.last("usb.blocked")["reason"] == "medium_not_storage"


def test_loan_revoked_mid_session_deauthorises_at_once(rig: Rig) -> None:
    rig.plug_medium()
    assert rig.authorized("1-4") == "1"
    rig.offer(site_policy([]))  # the controller's next bundle no longer carries the loan
    assert rig.authorized("1-4") == "0"
    blocked = rig.last("usb.blocked")
    assert (blocked["reason"], blocked["trigger"]) == ("no_active_loan", "policy")


def test_loan_returned_mid_session_deauthorises(rig: Rig) -> None:
    rig.plug_medium()
    rig.offer(site_policy([loan(returned_at=timefmt.now())]))
    assert rig.authorized("1-4") == "0" and rig.last("usb.blocked")["reason"] == "loan_returned"


def test_loan_window_ending_deauthorises_on_the_clock(rig: Rig) -> None:
    rig.plug_medium()
    rig.clock[0] += timedelta(hours=3)
    rig.guard.sweep()
    blocked = rig.last("usb.blocked")
    assert rig.authorized("1-4") == "0" and (blocked["reason"], blocked["trigger"]) == ("loan_expired", "clock")


def test_logout_deauthorises_and_login_of_borrower_restores(rig: Rig) -> None:
    rig.plug_medium()
    rig.plug_keyboard()
    rig.session.logout()
    assert (rig.authorized("1-4"), rig.authorized("1-1")) == ("0", "1")
    assert (rig.last("usb.blocked")["reason"], rig.last("usb.blocked")["trigger"]) == ("no_session", "session")
    rig.session.login("bob")
    assert rig.authorized("1-4") == "0" and rig.last("usb.blocked")["reason"] == "wrong_person"
    rig.session.login("alice")
    assert rig.authorized("1-4") == "1" and rig.last("usb.allowed")["trigger"] == "session"
    # The keyboard's outcome never changed, so it produced no further events.
    assert [p["sys_name"] for t, p in rig.usb_events() if t == "usb.allowed"] == ["1-4", "1-1", "1-4"]


def test_write_through_read_only_is_detected_and_medium_kept_out(rig: Rig) -> None:
    rig.plug_medium()
    disk = rig.blocks.block_devices("1-4")[0]
    rig.guard.sweep()
    assert rig.authorized("1-4") == "1"
    rig.blocks.write_sectors(disk, 8)
    rig.guard.sweep()
    attempt = rig.last("usb.write_attempt")
    assert (attempt["detected_by"], attempt["sectors_written"], attempt["person"]) == ("sectors_written", 8, "alice")
    assert rig.authorized("1-4") == "0" and rig.last("usb.blocked")["reason"] == "write_detected"
    rig.guard.reevaluate("session")
    assert rig.authorized("1-4") == "0"


def test_read_only_flag_cleared_is_a_write_attempt(rig: Rig) -> None:
    rig.plug_medium()
    rig.blocks.clear_read_only(rig.blocks.block_devices("1-4")[0])
    rig.guard.sweep()
    assert rig.last("usb.write_attempt")["detected_by"] == "ro_cleared" and rig.authorized("1-4") == "0"


def test_read_only_failure_blocks_the_medium(rig: Rig) -> None:
    rig.blocks.fail.add("sdb")
    rig.plug_medium()
    assert rig.authorized("1-4") == "0" and rig.last("usb.blocked")["reason"] == "readonly_failed"


def test_removal_is_recorded_with_what_was_known(rig: Rig) -> None:
    rig.plug_medium()
    rig.tree.remove_device("1-4")
    rig.hotplug.inject_remove("1-4")
    removed = rig.last("usb.removed")
    assert (removed["was"], removed["medium"], removed["vendor_product"]) == ("allowed", "m-001", "0951:1666")
    assert "1-4" not in rig.guard.decisions()


def test_serial_never_logged_unmasked(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    rig.plug_stick()
    rig.plug_medium()
    rig.session.login("bob")
    rig.blocks.fail.add("sdb")
    rig.tree.remove_device("1-4")
    rig.hotplug.inject_remove("1-4")
    assert caplog.records
    assert STICK_SERIAL not in caplog.text and MEDIUM_SERIAL not in caplog.text
    assert "***3456" in caplog.text


def test_concurrent_session_policy_and_hotplug_stay_consistent(rig: Rig) -> None:
    import threading

    rig.plug_medium()
    stop = threading.Event()

    def flip_session() -> None:
        while not stop.is_set():
            rig.session.logout()
            rig.session.login("alice")

    def replug() -> None:
        for _ in range(20):
            rig.plug_keyboard("1-1")
            rig.tree.remove_device("1-1")
            rig.hotplug.inject_remove("1-1")

    threads = [threading.Thread(target=flip_session), threading.Thread(target=replug)]
    for thread in threads:
        thread.start()
    threads[1].join(30)
    stop.set()
    threads[0].join(30)
    rig.session.login("alice")
    rig.guard.reevaluate("session")
    # Whatever interleaving happened, the end state matches the final session.
    assert rig.authorized("1-4") == "1" and rig.guard.decisions()["1-4"] == "allowed"
