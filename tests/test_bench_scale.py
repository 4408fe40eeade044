"""`sekisho bench scale` on a tiny load: both phases run, every event is stored once, every hop is timed.

No wall-clock assertions: the test checks the JSON line's shape and counts, that the bridged phase really
went through the site brokers (each event seen on its site broker and on the central broker), and that a
partition of the sites' links during the bridged phase still ends with nothing lost or duplicated.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sekisho.bench.cli import bench_app


@pytest.mark.broker
@pytest.mark.timeout(600)
def test_bench_scale_json(tmp_path: Path) -> None:
    args = ["scale", "--sites", "2", "--agents-per-site", "2", "--events", "40", "--partition-s", "2"]
    result = CliRunner().invoke(bench_app, [*args, "--workdir", str(tmp_path / "w")])
    assert result.exit_code == 0, result.output
    figures = json.loads(result.output.strip().splitlines()[-1])
    for key in ("bridged_eps", "direct_eps", "bridged_p99_ms", "direct_p99_ms"):
        assert figures[key] > 0, key
    assert (figures["lost"], figures["duplicates"], figures["failed"]) == (0, 0, [])
    assert (figures["agents"], figures["partition_s"]) == (4, 2.0)
    expected = 4 * 40
    # Every stored event has an end-to-end time; the bridged ones were seen on a site broker and at the centre.
    assert figures["bridged_hops"]["central broker → stored"]["n"] == expected
    assert figures["bridged_hops"]["agent → site broker"]["n"] == expected
    assert figures["bridged_hops"]["site broker → central broker"]["n"] == expected
    assert figures["direct_hops"]["agent → central broker"]["n"] == expected
    assert "agent → site broker" not in figures["direct_hops"]
    assert "links cut" in result.output and "links healed" in result.output
