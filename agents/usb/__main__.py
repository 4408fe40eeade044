"""``python -m sekisho.agents.usb --config agent.toml --terminal t-hr-01``: run an agent with the USB guard attached.

Admin rules (``--rules FILE``, USBGuard syntax) are evaluated before the product default. Until the
login guard exists the session is static: ``--person ID`` logs that person in, otherwise nobody is
and every lent medium is blocked (``no_session``).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

from sekisho.agents.runtime.agent import Agent
from sekisho.agents.runtime.config import load_config
from sekisho.agents.runtime.errors import AgentError
from sekisho.agents.usb.rules import read_rules_text
from sekisho.agents.usb.run import UsbGuardConfig, attach_usb_guard
from sekisho.agents.usb.session import StaticSession


def main(argv: list[str] | None = None) -> int:
    """Run the agent and its USB guard until SIGINT or SIGTERM."""
    parser = argparse.ArgumentParser(prog="python -m sekisho.agents.usb", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, type=Path, help="agent TOML file")
    parser.add_argument("--terminal", required=True, help="terminal id in the site policy")
    parser.add_argument("--sysfs-root", type=Path, help="a fake tree laid out like /sys/bus/usb/devices")
    parser.add_argument("--rules", type=Path, help="admin rules file (USBGuard rule language)")
    parser.add_argument("--person", help="static session: the person logged in")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        rules_text = read_rules_text(args.rules.read_bytes()) if args.rules else None
        agent = Agent(load_config(args.config))
    except (OSError, AgentError) as err:
        print(f"error: {err}", file=sys.stderr)
        return getattr(err, "exit_code", 2)
    try:
        attached = attach_usb_guard(
            agent,
            UsbGuardConfig(terminal_id=args.terminal, sysfs_root=args.sysfs_root, rules_text=rules_text),
            session=StaticSession(args.person),
        )
    except ValueError as err:
        agent.stop()
        print(f"error: rules: {err}", file=sys.stderr)
        return 2
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    agent.start()
    attached.start()
    try:
        while not stop.wait(1.0):
            pass
    finally:
        attached.stop()
        agent.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
