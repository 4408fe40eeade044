"""The demo is the product's front door: it must start everything, fill the records, and stop cleanly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import func, select

from sekisho.controller.store import Store, make_engine
from sekisho.controller.store.models import DeadLetter, Event

pytestmark = pytest.mark.broker


def _run_demo(root: Path, *extra: str, duration: int = 15) -> subprocess.CompletedProcess[str]:
    run = subprocess.run(
        [sys.executable, "-m", "sekisho", "demo", "--root", str(root), "--duration", str(duration), "--interval", "0.5",
         *extra],
        capture_output=True,
        text=True,
        timeout=180,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    return run


def _event_count(root: Path) -> int:
    engine = make_engine(f"sqlite:///{root / 'controller' / 'controller.db'}")
    try:
        with engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(Event)).scalar_one())
    finally:
        engine.dispose()


def test_demo_runs_fills_records_and_stops_cleanly(tmp_path: Path) -> None:
    root = tmp_path / "demo"
    run = _run_demo(root)
    assert "controller API" in run.stdout and "stopped" in run.stdout
    store = Store(make_engine(f"sqlite:///{root / 'controller' / 'controller.db'}"))
    with store.engine.connect() as conn:
        types = set(conn.execute(select(Event.type).distinct()).scalars())
        dead = conn.execute(select(func.count()).select_from(DeadLetter)).scalar_one()
        usb = [
            (row.type, row.payload)
            for row in conn.execute(
                select(Event.type, Event.payload).where(Event.type.like("usb.%")).order_by(Event.id)
            )
        ]
    assert {"agent.started", "agent.policy_applied", "card.presented"} <= types
    # Logins decided for real, and doors driven through the OSDP reader and locker board stubs.
    assert {"login.granted", "door.access_granted", "door.opened", "door.closed", "key.taken"} <= types, types
    assert dead == 0, "the demo's own traffic must never be refused"
    # USB: the lent medium is allowed read-only for its borrower and blocked for someone else;
    # a keyboard keeps working.
    assert any(t == "usb.allowed" and p.get("medium") == "m-0001" and p.get("read_only") for t, p in usb)
    assert any(t == "usb.blocked" and p.get("reason") == "wrong_person" for t, p in usb)
    assert any(t == "usb.allowed" and p.get("vendor_product") == "046d:c31c" for t, p in usb)
    assert store.verify_chains(signatures=True) == []
    with store.engine.connect() as conn:
        loans = conn.exec_driver_sql("SELECT key, person FROM key_loans").all()
    assert loans, "the key-lending register stayed empty"
    leftover = subprocess.run(["pgrep", "-f", str(root)], capture_output=True, text=True)
    assert leftover.stdout.strip() == "", "demo left processes running"


def test_demo_run_again_continues_and_fresh_starts_over(tmp_path: Path) -> None:
    """Regression: a second ./dev.sh demo stopped with a traceback (the first run's media loan overlapped)."""
    root = tmp_path / "demo"
    first = _run_demo(root, duration=6)
    assert "continuing" not in first.stdout
    after_first = _event_count(root)

    again = _run_demo(root, duration=6)
    assert "continuing the demo site" in again.stdout
    assert "from the earlier run is still open" in again.stdout  # the loan is kept, not lent twice
    after_again = _event_count(root)
    assert after_again > after_first, "the second run stored nothing"
    store = Store(make_engine(f"sqlite:///{root / 'controller' / 'controller.db'}"))
    try:
        assert store.verify_chains(signatures=True) == []  # one chain per agent across both runs
        with store.engine.connect() as conn:
            assert conn.execute(select(func.count()).select_from(DeadLetter)).scalar_one() == 0
            loans = conn.exec_driver_sql("SELECT count(*) FROM media_loans WHERE medium = 'm-0001'").scalar_one()
        assert loans == 1
    finally:
        store.engine.dispose()

    fresh = _run_demo(root, "--fresh", duration=6)
    assert "--fresh: removed the earlier demo site" in fresh.stdout
    assert "still open" not in fresh.stdout
    assert 0 < _event_count(root) < after_again


def test_demo_fresh_refuses_a_folder_that_is_not_a_demo_site(tmp_path: Path) -> None:
    root = tmp_path / "demo"
    (root / "pki").mkdir(parents=True)
    (root / "pki" / "ca.crt").write_text("not a real CA")
    (root / "thesis.tex").write_text("someone's work")
    run = subprocess.run(
        [sys.executable, "-m", "sekisho", "demo", "--root", str(root), "--fresh", "--duration", "1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode != 0
    assert "thesis.tex" in run.stdout + run.stderr
    assert (root / "thesis.tex").exists()
