"""`python -m agents.sim --config agent.toml`: an agent that emits demo traffic (used by `sekisho demo`)."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from pathlib import Path

from agents.runtime.agent import Agent
from agents.runtime.config import load_config
from agents.sim.traffic import run_traffic


def main() -> None:
    """Run one simulated agent until SIGINT/SIGTERM."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--interval", type=float, default=2.0, help="mean seconds between visits")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    agent = Agent(load_config(args.config))
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    agent.start()
    try:
        run_traffic(agent, stop, mean_interval_s=args.interval)
    finally:
        agent.stop()


if __name__ == "__main__":
    main()
