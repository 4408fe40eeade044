"""`sekisho bench ingest` on a small load: both halves run and count every message.

The raw MQTT baseline stopped publishing when the agents' listener began to admit a certificate only under its
own name (the publishers sent another username and were refused), and the bench printed ratio 0.00 without
failing. No wall-clock assertions: the test checks that the baseline and the durable path each moved every
message, and that the store holds every event once.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sekisho.bench.cli import bench_app


@pytest.mark.broker
@pytest.mark.timeout(600)
def test_bench_ingest_json(tmp_path: Path) -> None:
    args = ["ingest", "--agents", "2", "--per-agent", "300", "--workers", "1", "--rounds", "1"]
    result = CliRunner().invoke(bench_app, [*args, "--workdir", str(tmp_path / "w")])
    assert result.exit_code == 0, result.output
    figures = json.loads(result.output.strip().splitlines()[-1])
    assert figures["raw_eps"] > 0, result.output  # the baseline's publishers were admitted and delivered
    assert figures["durable_eps"] > 0 and figures["ratio"] > 0
    assert (figures["lost"], figures["duplicates"]) == (0, 0)


def test_bench_ingest_default_workers_follow_the_backend() -> None:
    """SQLite has one writer (a second process only queues for its lock); PostgreSQL gets two processes."""
    from sekisho.bench.cli import _is_postgres, default_workers

    assert default_workers(postgres=False) == 1
    assert default_workers(postgres=True) == 2
    assert _is_postgres("postgresql+psycopg://u@127.0.0.1:5999/db") and not _is_postgres("sqlite:///x.db")
    assert not _is_postgres(None)
