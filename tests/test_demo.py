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


def test_demo_runs_fills_records_and_stops_cleanly(tmp_path: Path) -> None:
    root = tmp_path / "demo"
    run = subprocess.run(
        [sys.executable, "-m", "sekisho", "demo", "--root", str(root), "--duration", "15", "--interval", "0.5"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
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
    assert store.verify_chains(keys=store.agent_keys()) == []
    with store.engine.connect() as conn:
        loans = conn.exec_driver_sql("SELECT key, person FROM key_loans").all()
    assert loans, "the key-lending register stayed empty"
    leftover = subprocess.run(["pgrep", "-f", str(root)], capture_output=True, text=True)
    assert leftover.stdout.strip() == "", "demo left processes running"
