"""`sekisho bench alerts` on a small load: it runs end to end and reports what it measured.

No wall-clock assertions: the test checks that every probe's alert reached the SSE stream and its e-mail the
SMTP server (nothing missing), that the figures are positive numbers, and that the background load was stored.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sekisho.bench.cli import bench_app


@pytest.mark.broker
@pytest.mark.timeout(600)
def test_bench_alerts_json(tmp_path: Path) -> None:
    args = ["alerts", "--probes", "6", "--background-eps", "60", "--publishers", "1", "--probe-gap-s", "0.1"]
    result = CliRunner().invoke(bench_app, [*args, "--workdir", str(tmp_path / "w")])
    assert result.exit_code == 0, result.output
    figures = json.loads(result.output.strip().splitlines()[-1])
    assert figures["missing"] == {"sse": 0, "email": 0}
    for key in ("sse_p50_ms", "sse_p99_ms", "email_p99_ms"):
        assert figures[key] > 0 and figures["baseline"][key] > 0, key
    assert figures["sse_p50_ms"] <= figures["sse_p99_ms"]
    assert figures["background_eps"] > 0  # the background agents' events were stored during the probes
    assert figures["probes"] == 6
