"""A terminal on a host without a USB bus (a VM: no /sys/bus/usb): `sekisho-agent terminal` used to die with
``UsbDescriptorError … errno=ENOENT`` and take the card-removal lock down with it. Now the USB guard says so
once, shows it in the heartbeat's last error and waits for a bus; the login guard keeps running."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sekisho.agents.login.run import start_terminal
from sekisho.agents.login.sessions import LoginSessions
from sekisho.agents.runtime.agent import Agent
from sekisho.agents.usb.run import NO_USB_BUS, UsbGuardConfig
from sekisho.drivers.biometric.simulated import SimulatedFingerprint
from sekisho.drivers.smartcard.simulated import SimulatedBackend, SimulatedCard
from sekisho.drivers.usb.fake import FakeSysfsTree
from sekisho.protocol import events

READER = "Sim Reader 0"


def _wait(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def _outbox_types(agent: Agent) -> list[str]:
    return [
        events.decode_event(raw, topic_agent=agent.config.agent_id).type for _, raw in agent.outbox.pending(limit=1000)
    ]


def test_no_usb_bus_is_a_clear_message_and_the_card_removal_lock_keeps_working(
    agent_setup: Callable[..., Any], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    setup = agent_setup()
    marker = tmp_path / "locked"
    lock = [sys.executable, "-c", f"open({str(marker)!r}, 'w').write('{{session}}')"]
    (setup.config_path.parent / "login.toml").write_text(f"lock_command = {json.dumps(lock)}\nend_command = []\n")
    # Laid out like a VM's /sys: a sysfs with no bus/usb in it at all.
    devices = tmp_path / "sys" / "bus" / "usb" / "devices"
    (tmp_path / "sys" / "bus").mkdir(parents=True)
    backend = SimulatedBackend((READER,))
    backend.insert(SimulatedCard(uid=bytes.fromhex("04A1B2C3D4E5F6"), uid_only=True), READER)
    agent = Agent(setup.config)
    usb = UsbGuardConfig(terminal_id="t-hr-01", sysfs_root=devices, sweep_interval_s=0.05, bus_retry_s=0.05)
    caplog.set_level(logging.INFO, logger="sekisho")
    running = start_terminal(
        agent, setup.config_path, "t-hr-01", backend=backend, usb=usb, poll_s=0.05, fingerprints=SimulatedFingerprint()
    )
    try:
        assert running.usb is not None and not running.usb.running
        assert running.alive()
        said = [r for r in caplog.records if r.name == "sekisho.agents.usb.run" and r.levelno == logging.ERROR]
        assert len(said) == 1 and "no USB bus" in said[0].getMessage() and "login guard" in said[0].getMessage()
        assert said[0].exc_info is None  # a fact of the host, not a crash: no traceback
        last = agent.errors.last()
        assert last is not None and last["code"] == NO_USB_BUS

        # The login guard still locks the session when the card is pulled.
        registry = LoginSessions(agent.config.state_dir)
        registry.granted("alice", "p-alice", READER, "c-alice")
        registry.opened("alice", "42")
        registry.close()
        _wait(lambda: running.watcher.current_person() == "p-alice")
        backend.remove(READER)
        _wait(lambda: marker.exists() and marker.read_text() == "42")
        _wait(lambda: "session.locked" in _outbox_types(agent))

        # Retries since then were not logged again.
        said = [r for r in caplog.records if r.name == "sekisho.agents.usb.run" and r.levelno == logging.ERROR]
        assert len(said) == 1

        # A USB controller appears (passed through to the VM): the guard starts and judges what is plugged in.
        tree = FakeSysfsTree(devices)
        tree.add_root_hub(1)
        tree.add_device("1-2", 0x0781, 0x5581, "4C530001234567891234", interfaces=[(0x08, 0x06, 0x50)])
        _wait(lambda: running.usb is not None and running.usb.running)
        _wait(lambda: running.usb is not None and running.usb.guard.decisions().get("1-2") == "blocked")
        assert any("USB media guard started" in r.getMessage() for r in caplog.records)
    finally:
        running.stop()


@pytest.mark.skipif(Path("/sys/bus/usb").exists(), reason="this host has a USB bus; the temp-tree test covers it")
def test_this_host_without_usb_starts_the_real_guard_without_a_crash(
    agent_setup: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    from sekisho.agents.usb.run import attach_usb_guard

    agent = Agent(agent_setup().config)
    caplog.set_level(logging.INFO, logger="sekisho")
    agent.start()
    attached = attach_usb_guard(agent, UsbGuardConfig(terminal_id="t-hr-01", bus_retry_s=3600))
    try:
        attached.start()  # the real sysfs root, udev hot-plug and BLKROSET control
        assert not attached.running
        assert any("no USB bus at /sys/bus/usb/devices" in r.getMessage() for r in caplog.records)
        last = agent.errors.last()
        assert last is not None and last["code"] == NO_USB_BUS
    finally:
        attached.stop()
        agent.stop()
