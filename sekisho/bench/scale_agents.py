"""The agents' side of ``sekisho bench scale``: real agents (outbox, sender, MQTT link) in one process.

Thirty agent processes would spend the two cores of a small test host on thirty interpreters; one process
running every agent's real runtime (``Agent``) costs a fraction and keeps each agent's own outbox, window,
resends and certificate. Each agent emits ``--count`` ``test.synthetic`` events at ``--rate`` per second
(payload note: the phase's name), then the process waits until every agent's outbox is acknowledged and
prints one JSON line: drained, and the agents' published/resent/acked counters summed.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from sekisho.agents.runtime.agent import Agent
from sekisho.agents.runtime.config import load_config

_SLICE_S = 0.01


def main(argv: list[str] | None = None) -> int:
    """Run the agents named by their configs, emit, wait until drained; exit 0 only if all drained."""
    parser = argparse.ArgumentParser(prog="sekisho.bench.scale_agents")
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--rate", type=float, default=0.0, help="events per second per agent (0: flat out)")
    parser.add_argument("--note", default="")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("configs", nargs="+", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    agents = [Agent(load_config(path)) for path in args.configs]
    for agent in agents:
        agent.start()
    started = time.monotonic()
    emitted = 0
    try:
        while emitted < args.count:
            due = args.count if args.rate <= 0 else min(args.count, int((time.monotonic() - started) * args.rate) + 1)
            if due <= emitted:
                time.sleep(_SLICE_S)
                continue
            for agent in agents:
                agent.emit_many([("test.synthetic", {"n": n, "note": args.note}) for n in range(emitted, due)])
            emitted = due
        deadline = started + args.timeout
        drained = all(agent.wait_drained(max(0.0, deadline - time.monotonic())) for agent in agents)
        stats = [agent.stats() for agent in agents]
    finally:
        for agent in agents:
            agent.stop()
    print(
        json.dumps(
            {
                "drained": drained,
                "agents": len(agents),
                "emitted": emitted * len(agents),
                "published": sum(s.published for s in stats),
                "resent": sum(s.resent for s in stats),
                "acked": sum(s.acked for s in stats),
                "emit_s": round(time.monotonic() - started, 3),
            }
        ),
        flush=True,
    )
    return 0 if drained else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
