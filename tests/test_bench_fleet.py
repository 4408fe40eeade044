"""`sekisho bench fleet` on a small fleet: real agents, broker, controller and enrolment; nothing lost."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from sekisho.bench.fleet import percentile, site_policy

SUMMARY_KEYS = {
    "agents",
    "revocation_p50_ms",
    "revocation_p99_ms",
    "reconnect_all_s",
    "lost",
    "enrol_100_s",
    "baseline_p50_ms",
    "baseline_p99_ms",
    "duplicates",
    "events",
}


def _leftovers() -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob("sekisho-bench-fleet-*"))


def test_bench_fleet_small_run_reports_every_figure_and_loses_nothing() -> None:
    before = _leftovers()
    result = subprocess.run(
        [sys.executable, "-m", "sekisho", "bench", "fleet", "--agents", "20", "--rounds", "2", "--enrol", "5",
         "--processes", "2", "--outage-s", "1", "--timeout-s", "240"],
        capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(summary) >= SUMMARY_KEYS
    assert summary["agents"] == 20 and summary["enrol_agents"] == 5 and summary["rounds"] == 2
    assert summary["lost"] == 0 and summary["duplicates"] == 0
    # Every agent recorded its start, two policy versions applied and 2 × 5 synthetic events at least.
    assert summary["events"] >= 20 * (1 + 2 + 10)
    for key in ("revocation_p50_ms", "revocation_p99_ms", "reconnect_all_s", "enrol_100_s", "baseline_p99_ms"):
        assert isinstance(summary[key], int | float) and summary[key] > 0, key
    assert summary["revocation_p99_ms"] >= summary["revocation_p50_ms"]
    # The run cleans up after itself: no temp dir left, no broker or controller left running on it.
    assert _leftovers() <= before
    assert "sekisho-bench-fleet-" not in subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout


def test_site_policy_revokes_one_site_wide_person_on_every_terminal() -> None:
    agents = [f"fleet-{i:04d}" for i in range(1, 31)]
    before, after = site_policy(agents, 0), site_policy(agents, 1)
    for agent in agents:
        old, new = before.for_agent(agent), after.for_agent(agent)
        # Each terminal's bundle names the site-wide person, whose card the revocation turns off.
        assert [c["status"] for c in old["cards"] if c["person"] == "p-site-01"] == ["active"]
        assert [c["status"] for c in new["cards"] if c["person"] == "p-site-01"] == ["revoked"]
        assert [p["active"] for p in new["people"] if p["id"] == "p-site-01"] == [False]
        assert [c for c in new["cards"] if c["person"] != "p-site-01"] == [
            c for c in old["cards"] if c["person"] != "p-site-01"
        ]


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile([7.0], 99) == 7.0
    assert percentile([3.0, 1.0, 2.0], 100) == 3.0
