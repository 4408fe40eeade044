"""`sekisho bench outage` small: 20 real agents buffer 2,000 events while the broker is down, nothing lost.

The same code as the 10-minute run recorded in docs/benchmarks.md, with fewer events and a few seconds down.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import pytest

from sekisho.bench.outage import OutageOptions, tally

pytestmark = [pytest.mark.broker, pytest.mark.faults]


def test_events_split_between_agents_add_up() -> None:
    assert OutageOptions(agents=3, events=10).per_agent() == [4, 3, 3]
    assert sum(OutageOptions(agents=20, events=100_000).per_agent()) == 100_000


def test_outage_of_a_few_seconds_with_20_agents_loses_and_doubles_nothing() -> None:
    result = subprocess.run(
        [
            sys.executable, "-m", "sekisho", "bench", "outage", "--agents", "20", "--events", "2000",
            "--down-s", "5", "--reconnect-max-s", "2", "--timeout-s", "300",
        ],
        capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    line = json.loads(result.stdout.strip().splitlines()[-1])
    assert line["events"] == 2000
    assert line["stored"] == 2000
    assert (line["lost"], line["duplicated"], line["seq_gaps"], line["outbox_left"]) == (0, 0, 0, 0)
    assert line["chains_verify"] is True
    assert line["agents_drained"] == 20
    assert line["down_s"] >= 5


def test_counting_sees_a_lost_and_a_doubled_event_and_a_seq_gap() -> None:
    """The counts the bench prints must show a doubled and a missing event and a gap in the seqs."""
    rows = [
        ("a", 1, "agent.started", {}),
        ("a", 2, "test.synthetic", {"n": 0}),
        ("a", 3, "test.synthetic", {"n": 1}),
        ("a", 5, "test.synthetic", {"n": 1}),  # n=1 twice, n=2 never, seq 4 missing
        ("b", 1, "test.synthetic", {"n": 0}),
        ("other", 1, "test.synthetic", {"n": 9}),  # not one of the bench's agents
    ]
    counted = tally(rows, {"a": 3, "b": 1})
    assert (counted.stored, counted.lost, counted.duplicated, counted.seq_gaps) == (4, 1, 1, 1)
    assert Counter(p.split(":")[0] for p in counted.problems) == {"a": 2}
    clean = tally([("b", 1, "test.synthetic", {"n": 0})], {"b": 1})
    assert (clean.stored, clean.lost, clean.duplicated, clean.seq_gaps, clean.problems) == (1, 0, 0, 0, [])
