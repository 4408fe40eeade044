"""`python -m sekisho.agents.sim --config agent.toml`: an agent that emits demo traffic (used by `sekisho demo`).

With `--usb-terminal`, the agent also runs the real USB guard on a fake sysfs tree and plugs demo
devices into it: an unregistered stick, a keyboard, and a lent medium for its borrower and for
someone else.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from pathlib import Path

from sekisho.agents.runtime.agent import Agent
from sekisho.agents.runtime.config import load_config
from sekisho.agents.sim.traffic import run_traffic
from sekisho.agents.sim.usb_traffic import run_usb_traffic
from sekisho.agents.usb.guard import UsbGuard
from sekisho.agents.usb.session import StaticSession
from sekisho.drivers.usb.blockdev import FakeBlockDevices
from sekisho.drivers.usb.events import InjectedHotplug
from sekisho.drivers.usb.fake import FakeSysfsTree
from sekisho.drivers.usb.sysfs import SysfsUsb


def _start_usb(agent: Agent, args: argparse.Namespace, stop: threading.Event) -> UsbGuard:
    tree = FakeSysfsTree(Path(agent.config.state_dir) / "fake-sysfs")
    if not (tree.root / "usb1").exists():
        tree.add_root_hub(1)
    sysfs = SysfsUsb(tree.root)
    hotplug = InjectedHotplug(sysfs)
    session = StaticSession()
    blocks = FakeBlockDevices(tree.root)
    guard = UsbGuard(agent.emit_many, agent.policy, sysfs, hotplug, session, args.usb_terminal, blocks)
    guard.start()
    threading.Thread(
        target=run_usb_traffic,
        args=(guard, tree, hotplug, session, blocks, stop),
        kwargs={
            "borrower": args.borrower,
            "other_person": args.other_person,
            "medium_serial": args.medium_serial,
            "interval_s": args.interval * 2,
        },
        name="demo-usb",
        daemon=True,
    ).start()
    return guard


def main() -> None:
    """Run one simulated agent until SIGINT/SIGTERM."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--interval", type=float, default=2.0, help="mean seconds between visits")
    parser.add_argument("--usb-terminal", help="run the USB guard for this terminal id on a fake sysfs tree")
    parser.add_argument("--borrower", default="p-0001", help="person the demo medium is lent to")
    parser.add_argument("--other-person", default="p-0002", help="someone else who plugs it in")
    parser.add_argument("--medium-serial", default="DEMO-USB-0001", help="serial of the lent demo medium")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    agent = Agent(load_config(args.config))
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    agent.start()
    guard = _start_usb(agent, args, stop) if args.usb_terminal else None
    try:
        run_traffic(agent, stop, mean_interval_s=args.interval)
    finally:
        if guard is not None:
            guard.stop()
        agent.stop()


if __name__ == "__main__":
    main()
