"""``sekisho bench usb``: add event → decision written, on a fake sysfs tree with a real agent outbox.

Each insertion is timed from the injected ``add`` (the device is read from the tree, as the udev
path does) until the guard returns, i.e. after both events are in the outbox (fsync'd) and the
``authorized`` file is written. Baseline, measured in the same run on the same tree: reading the
device and writing ``authorized`` with no policy, no events and no loans.

With ``--vs-usbguard N``, N more plugs go through the real usbguard-daemon's umockdev testbed and are
judged there by the daemon and by the guard at once (sekisho/bench/usb_vs_usbguard.py says how each
is timed); the summary then has ``usbguard_p50_ms``/``usbguard_p99_ms`` and, measured the same way,
``guard_umockdev_p50_ms``/``guard_umockdev_p99_ms``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from sekisho.agents.runtime.agent import Agent
from sekisho.agents.usb.guard import UsbGuard
from sekisho.agents.usb.session import StaticSession
from sekisho.bench.offline import offline_agent
from sekisho.drivers.usb.blockdev import FakeBlockDevices
from sekisho.drivers.usb.events import InjectedHotplug
from sekisho.drivers.usb.fake import FakeSysfsTree
from sekisho.drivers.usb.sysfs import SysfsUsb
from sekisho.protocol import timefmt
from sekisho.protocol.policy import MediaLoan, Medium, Person, Site, SitePolicy, Terminal

AGENT = "bench-usb"
TERMINAL = "t-bench-01"
MEDIUM_SERIAL = "BENCH-MEDIUM-0001"
# (kind, vendor, product, serial, interfaces): a keyboard, an unregistered stick, the lent medium.
KINDS = (
    ("keyboard", 0x046D, 0xC31C, "", ((0x03, 0x01, 0x01),)),
    ("stick", 0x0781, 0x5581, "4C5300012300001234", ((0x08, 0x06, 0x50),)),
    ("medium", 0x0951, 0x1666, MEDIUM_SERIAL, ((0x08, 0x06, 0x50),)),
)


def bench_policy() -> dict[str, Any]:
    """Return the benchmark's site policy: Alice holds a read-only loan of the medium on this terminal."""
    now = timefmt.now()
    return SitePolicy(
        site=Site(name="bench"),
        people=[Person(id="alice", name="Alice"), Person(id="mgr", name="Manager")],
        terminals=[Terminal(id=TERMINAL, name="bench terminal", agent=AGENT, handlers=["alice"])],
        media=[
            Medium(
                id="m-001",
                name="bench medium",
                department="HR",
                serial_sha256=hashlib.sha256(MEDIUM_SERIAL.encode()).hexdigest(),
            )
        ],
        loans=[
            MediaLoan(
                id="loan-1",
                medium="m-001",
                person="alice",
                terminals=[TERMINAL],
                starts_at=now - timedelta(hours=1),
                ends_at=now + timedelta(days=1),
                purpose="bench",
                read_only=True,
                approved_by="mgr",
            )
        ],
    ).model_dump(mode="json")


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run_usb_bench(count: int, console: Console | None = None, *, vs_usbguard: int = 0) -> dict[str, float]:
    """Run the benchmark (and ``vs_usbguard`` plugs against usbguard-daemon); print tables and the JSON summary."""
    console = console or Console()
    root = Path(tempfile.mkdtemp(prefix="sekisho-bench-usb-"))
    agent: Agent | None = None
    guard: UsbGuard | None = None
    try:
        agent = offline_agent(root, AGENT, bench_policy())
        outbox_sync = agent.config.outbox_sync
        tree = FakeSysfsTree(root / "sys")
        tree.add_root_hub(1)
        sysfs = SysfsUsb(tree.root)
        hotplug = InjectedHotplug(sysfs)
        guard = UsbGuard(
            agent.emit_many, agent.policy, sysfs, hotplug, StaticSession("alice"), TERMINAL, FakeBlockDevices(tree.root)
        )
        guard.start()

        baseline: list[float] = []
        decision: list[float] = []
        per_kind: dict[str, list[float]] = {kind[0]: [] for kind in KINDS}
        for i in range(count):
            kind, vendor, product, serial, interfaces = KINDS[i % len(KINDS)]
            # Baseline: the same device, read and authorised with no policy and no record.
            tree.add_device("1-3", vendor, product, serial=serial, interfaces=interfaces, authorized=False)
            started = time.perf_counter()
            sysfs.read_device("1-3")
            sysfs.authorize("1-3")
            baseline.append((time.perf_counter() - started) * 1000)
            tree.remove_device("1-3")

            tree.add_device("1-2", vendor, product, serial=serial, interfaces=interfaces, authorized=False)
            started = time.perf_counter()
            hotplug.inject_add("1-2")
            elapsed = (time.perf_counter() - started) * 1000
            decision.append(elapsed)
            per_kind[kind].append(elapsed)
            tree.remove_device("1-2")
            hotplug.inject_remove("1-2")

        guard.stop()
        guard = None
        summary: dict[str, float] = {
            "decision_p50_ms": round(statistics.median(decision), 3),
            "decision_p99_ms": round(_percentile(decision, 0.99), 3),
            "baseline_p50_ms": round(statistics.median(baseline), 3),
            "baseline_p99_ms": round(_percentile(baseline, 0.99), 3),
        }
        table = Table("measure", "p50 (ms)", "p99 (ms)", "n", title=f"bench usb: add → decision written ({count:,})")
        table.add_row(
            "guard decision (2 events, one fsync, + authorized)",
            f"{summary['decision_p50_ms']:.3f}",
            f"{summary['decision_p99_ms']:.3f}",
            str(len(decision)),
        )
        for kind, values in per_kind.items():
            if values:
                table.add_row(
                    f"  {kind}",
                    f"{statistics.median(values):.3f}",
                    f"{_percentile(values, 0.99):.3f}",
                    str(len(values)),
                )
        table.add_row(
            "baseline: read device + write authorized",
            f"{summary['baseline_p50_ms']:.3f}",
            f"{summary['baseline_p99_ms']:.3f}",
            str(len(baseline)),
        )
        console.print(table)
        console.print(f"outbox sync: {outbox_sync}; goal p99 ≤ 10 ms (USBGuard: 3–5 ms)")
        if vs_usbguard:
            # usbguard's figures right after decision_p99_ms, the guard's in the same testbed next to them.
            versus = _versus_usbguard(vs_usbguard, console)
            head = {key: summary.pop(key) for key in ("decision_p50_ms", "decision_p99_ms")}
            summary = head | versus | summary
        print(json.dumps(summary))
        return summary
    finally:
        if guard is not None:
            guard.stop()
        if agent is not None:
            agent.stop()
        shutil.rmtree(root, ignore_errors=True)


def _versus_usbguard(count: int, console: Console) -> dict[str, float]:
    """Plug ``count`` devices into usbguard-daemon's testbed, judged by it and the guard; print a table."""
    from sekisho.bench.usb_vs_usbguard import run_vs_usbguard

    result = run_vs_usbguard(count)
    if not result.guard_ms:
        raise RuntimeError(f"no plug was judged by both ({result.timeouts} timeouts)")
    table = Table(
        "measure",
        "p50 (ms)",
        "p99 (ms)",
        "n",
        title=f"bench usb --vs-usbguard: uevent → decision, both in usbguard-daemon's umockdev testbed ({count:,})",
    )
    rows = [
        ("usbguard-daemon 1.1.2 (→ its audit record, 1 ms stamps)", result.usbguard_ms),
        ("sekisho guard (2 events, one fsync, + authorized)", result.guard_ms),
    ]
    for kind, (guard_ms, usbguard_ms) in result.per_kind.items():
        rows += [(f"  {kind}: usbguard", usbguard_ms), (f"  {kind}: guard", guard_ms)]
    rows.append(("shared: plug file → uevent (umockdev, not a kernel's)", result.delivery_ms))
    for label, values in rows:
        if values:
            table.add_row(
                label, f"{statistics.median(values):.3f}", f"{_percentile(values, 0.99):.3f}", str(len(values))
            )
    console.print(table)
    console.print(
        f"verdicts: {result.agree} the same, {len(result.differ)} different; {result.timeouts} timeouts; "
        f"usbguard stamped before t0 (counted as 0 ms): {result.clamped}; {result.elapsed_s:.1f} s; "
        f"guard outbox sync: {result.outbox_sync}"
    )
    for line in result.differ[:10]:
        console.print(f"  differs: {line}", soft_wrap=True)
    return {
        "usbguard_p50_ms": round(statistics.median(result.usbguard_ms), 3),
        "usbguard_p99_ms": round(_percentile(result.usbguard_ms, 0.99), 3),
        "guard_umockdev_p50_ms": round(statistics.median(result.guard_ms), 3),
        "guard_umockdev_p99_ms": round(_percentile(result.guard_ms, 0.99), 3),
        "umockdev_delivery_p50_ms": round(statistics.median(result.delivery_ms), 3),
        "usbguard_n": len(result.usbguard_ms),
        "verdicts_differ": len(result.differ),
    }
