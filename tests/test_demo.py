"""The demo is the product's front door: it must start everything, fill the records, and stop cleanly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import func, select

from sekisho.common.i18n import lang_from_env
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


def test_demo_prints_the_console_and_a_login_per_role_that_signs_in(tmp_path: Path) -> None:
    """Issue 12, item 8: the demo's controller serves the console; each printed demo login works."""
    import http.cookiejar
    import re
    import signal
    import time
    import urllib.error
    import urllib.parse
    import urllib.request

    root = tmp_path / "demo"
    command = [sys.executable, "-m", "sekisho", "demo", "--root", str(root), "--duration", "90", "--interval", "0.5"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not any("controller API" in line for line in lines):
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
        output = "".join(lines)
        url = re.search(r"console: (http://127\.0\.0\.1:\d+)/console/", output)
        assert url, output
        base = url.group(1)
        logins = dict(re.findall(r"demo login: (\S+)  role: (\S+)", output))
        assert set(logins.values()) == {"it_admin", "facility_manager", "security", "auditor", "area_manager"}
        # The warning in the language the demo picked from the inherited environment (Japanese unless en).
        assert ("DEMO ONLY" if lang_from_env() == "en" else "デモ専用") in output
        assert re.search(r"demo login: demo-security .* TOTP secret: [A-Z2-7]{32}", output)
        password = re.search(r"demo login: demo-auditor  role: auditor  password: (\S+)", output)
        assert password, output

        # The first user closed the dev profile's open loopback access: the API wants a token now.
        try:
            urllib.request.urlopen(f"{base}/api/v1/events", timeout=5)
            raise AssertionError("the API answered without a token")
        except urllib.error.HTTPError as err:
            assert err.code == 401

        jar = http.cookiejar.CookieJar()
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
        page = opener.open(f"{base}/console/login", timeout=5).read().decode()
        token = re.search(r'name="csrf_token" value="([^"]+)"', page)
        assert token, page
        form = {"login": "demo-auditor", "password": password.group(1), "totp": "", "csrf_token": token.group(1)}
        opener.open(f"{base}/console/login", urllib.parse.urlencode(form).encode(), timeout=10)
        muster = opener.open(f"{base}/console/muster", timeout=10)
        assert muster.url.endswith("/console/muster")
        text = muster.read().decode()
        assert "在室者" in text and "人事部 管理区域" in text
        assert "/console/muster/confirm" not in text  # an auditor gets no tick control
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0
