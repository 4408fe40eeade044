"""Benchmark of the terminal login guard: card removal → lock command, and the PAM decision without the human."""

from __future__ import annotations

import contextlib
import json
import statistics
import sys
import tempfile
import threading
import time
from datetime import datetime
from datetime import time as clock_time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from sekisho.drivers.smartcard.protocol import CardEvent
from sekisho.lab.pcscd import VPCD_READER, own_pcscd, pcscd_unavailable

SITE_KEY = b"bench-site-key-0123456789abcdef!"


def _percentile(values: list[float], q: int) -> float:
    if len(values) < 2:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def _removal_to_lock(removals: int, workdir: Path) -> list[float]:
    """Insert and remove the card ``removals`` times; return socket close → lock command started, in seconds."""
    from sekisho.agents.login.lock import CardRemovalLock
    from sekisho.drivers.smartcard.pcsc import PcscBackend
    from sekisho.firmware_stubs.piv_card import VirtualCard

    marker = workdir / "locked"
    emitted: list[str] = []
    latencies: list[float] = []
    with PcscBackend() as backend:
        if not backend.wait_until_monitoring(5):
            raise RuntimeError("the PC/SC monitor did not start")
        lock = CardRemovalLock(
            backend,
            reader=VPCD_READER,
            terminal="bench-term",
            user="bench",
            emit=lambda type_, _payload: emitted.append(type_),
            lock_command=[sys.executable, "-c", f"open({str(marker)!r}, 'a').write('x')"],
            end_command=None,
            end_after_s=3600,
        )
        inserted = threading.Event()

        def on_cards(event: CardEvent) -> None:
            if any(c.reader == VPCD_READER for c in event.added):
                inserted.set()

        unsubscribe = backend.subscribe(on_cards)
        lock.start()
        card = VirtualCard(uid=bytes.fromhex("04BE7C4000AA01"))
        try:
            for _ in range(removals):
                inserted.clear()
                card.insert()
                # The next close must be a removal pcscd sees on its own, so wait until it reported the card.
                if not inserted.wait(5):
                    raise RuntimeError("pcscd did not report the card inserted within 5 s")
                before = lock.last_lock_started_at
                closed = time.monotonic()
                card.remove()
                _wait_until(lambda before=before: lock.last_lock_started_at != before, 5)
                started = lock.last_lock_started_at
                assert started is not None
                latencies.append(started - closed)
        finally:
            lock.stop()
            unsubscribe()
            card.remove()
        if lock.errors:
            raise RuntimeError(f"lock command failures: {lock.errors[:3]}")
    return latencies


def _wait_until(predicate: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError("timed out waiting for the card event")
        time.sleep(0.002)


def _pam_decision(iterations: int) -> list[float]:
    """Time the simulated card check, a finger result and ``decide_login`` together, ``iterations`` times."""
    from sekisho.agents.login.decision import CardCheck, FingerCheck, decide_login
    from sekisho.drivers.smartcard.auth import authenticate, enrol_card
    from sekisho.drivers.smartcard.simulated import SimulatedBackend, SimulatedCard
    from sekisho.protocol.policy import SitePolicy

    backend = SimulatedBackend()
    card = SimulatedCard(uid=bytes.fromhex("04A1B2C3D4E5F6"))
    backend.insert(card)
    with contextlib.closing(backend.connect("Simulated Reader 0")) as conn:
        enrolled = enrol_card(conn, card_id="card-1", site_key=SITE_KEY).as_enrolled()
    policy = SitePolicy.model_validate(
        {
            "site": {"name": "bench"},
            "schedules": [
                {
                    "id": "always",
                    "name": "always",
                    "weekdays": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"],
                    "start": clock_time(0, 0),
                    "end": clock_time(23, 59, 59),
                    "on_public_holidays": True,
                }
            ],
            "people": [{"id": "p1", "name": "Bench", "logins": ["bench"]}],
            "cards": [
                {
                    "id": "card-1",
                    "person": "p1",
                    "kind": "piv",
                    "uid_hash": enrolled.uid_hash,
                    "public_key_pem": enrolled.public_key_pem,
                }
            ],
            "terminals": [
                {"id": "bench-term", "name": "Bench", "agent": "bench", "handlers": ["p1"], "schedule": "always"}
            ],
        }
    )
    timings: list[float] = []
    for _ in range(iterations):
        began = time.perf_counter()
        with contextlib.closing(backend.connect("Simulated Reader 0")) as conn:
            result = authenticate(conn, [enrolled], site_key=SITE_KEY)
        check = CardCheck(present=True, card_id=result.card_id, authenticated=result.ok, weak=result.weak)
        # The fingerprint match itself is the sensor's and the person's time; only its result enters here.
        finger = FingerCheck(outcome="match", attempts=1)
        decision = decide_login(
            policy, "valid", None, "bench-term", "bench", check, finger, datetime.now().astimezone()
        )
        timings.append(time.perf_counter() - began)
        if not decision.granted:
            raise RuntimeError(f"the bench login was refused: {decision.reason} {decision.detail}")
    return timings


def run_login_bench(removals: int, console: Console, iterations: int = 200) -> int:
    """Run both measurements, print a table and the JSON summary line; return the exit status."""
    unavailable = pcscd_unavailable()
    if unavailable is not None:
        console.print(f"login bench needs the real pcscd with vpcd: {unavailable}")
        return 2
    with tempfile.TemporaryDirectory(prefix="sekisho-bench-login-") as tmp, own_pcscd():
        lock_s = _removal_to_lock(removals, Path(tmp))
    pam_s = _pam_decision(iterations)
    figures = {
        "removal_to_lock_p50_ms": round(_percentile(lock_s, 50) * 1000, 2),
        "removal_to_lock_p95_ms": round(_percentile(lock_s, 95) * 1000, 2),
        "pam_decision_p95_ms": round(_percentile(pam_s, 95) * 1000, 2),
    }
    table = Table(title="terminal login guard")
    for column in ("measurement", "samples", "p50 ms", "p95 ms", "max ms"):
        table.add_column(column)
    for name, values in (("card removal → lock command started", lock_s), ("PAM decision (no human)", pam_s)):
        table.add_row(
            name,
            str(len(values)),
            f"{_percentile(values, 50) * 1000:.2f}",
            f"{_percentile(values, 95) * 1000:.2f}",
            f"{max(values) * 1000:.2f}",
        )
    console.print(table)
    print(json.dumps(figures))
    return 0
