"""Benchmark of the terminal login guard: card removal → lock command (pcscd's detection and the guard's own
part), the whole PAM call as pam_exec pays it (a new process, the agent's decision with the card through pcscd,
the finger taken out) against the old in-process helper, the PAM decision alone without the human, and the PAM
decision when the card stalls mid challenge–response (real pcscd, vpcd, the helper's own deadline).
"""

from __future__ import annotations

import contextlib
import io
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timedelta
from datetime import time as clock_time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from sekisho.drivers.smartcard.protocol import CardEvent
from sekisho.lab.pcscd import VPCD_READER, own_pcscd, pcscd_unavailable

SITE_KEY = b"bench-site-key-0123456789abcdef!"
AGENT, TERMINAL = "bench-login", "bench-term"


def _percentile(values: list[float], q: int) -> float:
    if len(values) < 2:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def _removal_to_lock(removals: int, workdir: Path) -> tuple[list[float], list[float], list[float]]:
    """Insert and remove the card ``removals`` times; return (removal reported, lock started, guard's overhead).

    The first two from the card's vpcd socket closing: to the backend's observers learning of the removal
    (pcscd's detection), and to ``CardRemovalLock`` starting the lock command. The third from the observers
    learning of it to the lock command being started: what the guard adds — ``session.locked`` signed and
    fsync'd into an outbox as the agent does, then the command handed to ``Popen``.
    """
    from sekisho.agents.login.lock import CardRemovalLock
    from sekisho.agents.runtime.outbox import Outbox
    from sekisho.drivers.smartcard.pcsc import PcscBackend
    from sekisho.firmware_stubs.piv_card import VirtualCard
    from sekisho.protocol import signing

    marker = workdir / "locked"
    detections: list[float] = []
    latencies: list[float] = []
    overheads: list[float] = []
    outbox = Outbox(workdir / "lock-outbox.sqlite3", signing_key=signing.generate_key(), agent_id="bench-lock")
    with contextlib.closing(outbox), PcscBackend() as backend:
        if not backend.wait_until_monitoring(5):
            raise RuntimeError("the PC/SC monitor did not start")
        lock = CardRemovalLock(
            backend,
            reader=VPCD_READER,
            terminal="bench-term",
            user="bench",
            emit=outbox.append,
            lock_command=[sys.executable, "-c", f"open({str(marker)!r}, 'a').write('x')"],
            end_command=None,
            end_after_s=3600,
        )
        inserted = threading.Event()
        removed_at: list[float] = []

        def on_cards(event: CardEvent) -> None:
            # Subscribed before the lock, so called first: the moment the observers learn of the removal.
            if any(c.reader == VPCD_READER for c in event.removed):
                removed_at.append(time.monotonic())
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
                reported = len(removed_at)
                closed = time.monotonic()
                card.remove()
                _wait_until(lambda before=before: lock.last_lock_started_at != before, 5)
                started = lock.last_lock_started_at
                assert started is not None and len(removed_at) > reported
                detections.append(removed_at[reported] - closed)
                latencies.append(started - closed)
                overheads.append(started - removed_at[reported])
        finally:
            lock.stop()
            unsubscribe()
            card.remove()
        if lock.errors:
            raise RuntimeError(f"lock command failures: {lock.errors[:3]}")
    return detections, latencies, overheads


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


def _bench_agent(workdir: Path, uid: bytes, key: Any) -> tuple[Path, Path]:
    """Set up an agent in ``workdir`` whose signed policy enrols the card (``uid``, ECC ``key``) for user bench.

    Returns the agent TOML and the state directory; login.toml beside it has the shipped defaults for the
    card part and names only the reader.
    """
    from cryptography.hazmat.primitives import serialization

    from sekisho.agents.runtime.policy_cache import CACHE_NAME
    from sekisho.common.files import write_atomically
    from sekisho.deploy.pki import PkiPaths, init_pki, issue_agent
    from sekisho.drivers.smartcard import hash_uid
    from sekisho.lab import write_toml
    from sekisho.protocol import messages, signing
    from sekisho.protocol.policy import SitePolicy

    agent, terminal = AGENT, TERMINAL
    init_pki(workdir / "pki")
    creds = issue_agent(workdir / "pki", agent)
    config = write_toml(
        workdir / "agent" / "agent.toml",
        {
            "agent_id": agent,
            "ca_cert": str(creds.ca_cert),
            "tls_cert": str(creds.tls_cert),
            "tls_key": str(creds.tls_key),
            "signing_key": str(creds.signing_key),
            "controller_public_key": str(creds.controller_signing_pub),
            "state_dir": str(workdir / "agent" / "state"),
        },
    )
    (workdir / "agent" / "site.key").write_bytes(SITE_KEY)
    # The shipped defaults for the card part; only the reader is named.
    write_toml(workdir / "agent" / "login.toml", {"site_key_file": "site.key", "reader": VPCD_READER})
    pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    policy = SitePolicy.model_validate(
        {
            "site": {"name": "bench"},
            "people": [{"id": "p1", "name": "Bench", "logins": ["bench"]}],
            "cards": [
                {
                    "id": "card-1",
                    "person": "p1",
                    "kind": "piv",
                    "uid_hash": hash_uid(uid, SITE_KEY),
                    "public_key_pem": pem.decode(),
                }
            ],
            "terminals": [{"id": terminal, "name": "Bench", "agent": agent, "handlers": ["p1"]}],
        }
    )
    controller_key = signing.load_private_key(PkiPaths.at(workdir / "pki").controller_signing_key)
    bundle = messages.build_bundle(
        controller_key, agent=agent, version=1, policy=policy.for_agent(agent), lifetime=timedelta(hours=1)
    )
    state = workdir / "agent" / "state"
    state.mkdir(parents=True, exist_ok=True)
    write_atomically(state / CACHE_NAME, bundle)
    return config, state


def _stalled_refusals(stalls: int, workdir: Path) -> tuple[list[float], float]:
    """Run the PAM helper ``stalls`` times while the enrolled card stalls at GENERAL AUTHENTICATE.

    Returns each ``PamHelper.run()`` duration (policy check, card part until its deadline, the signed
    ``login.denied`` written to the outbox) in seconds, and the configured ``card_timeout_s``. In-process, so
    the interpreter's start-up (pam_exec starts a new one each time) is not part of it.
    """
    from cryptography.hazmat.primitives.asymmetric import ec

    from sekisho.agents.login.messages import message
    from sekisho.agents.login.pam import LoginAgentSettings, PamHelper
    from sekisho.agents.runtime.outbox import Outbox
    from sekisho.drivers.smartcard.pcsc import PcscBackend
    from sekisho.firmware_stubs.piv_card import INS_GENERAL_AUTHENTICATE, VirtualCard
    from sekisho.protocol import events, signing

    agent, terminal, uid = AGENT, TERMINAL, bytes.fromhex("04BE7C4000AA02")
    key = ec.generate_private_key(ec.SECP256R1())
    config, state = _bench_agent(workdir, uid, key)

    env = {"PAM_USER": "bench", "PAM_TYPE": "auth", "PAM_SERVICE": "bench"}
    timings: list[float] = []
    present = threading.Event()
    absent = threading.Event()

    def on_cards(event: CardEvent) -> None:
        if any(c.reader == VPCD_READER for c in event.removed):
            absent.set()
        if any(c.reader == VPCD_READER for c in event.added):
            present.set()

    with PcscBackend() as backend:
        if not backend.wait_until_monitoring(5):
            raise RuntimeError("the PC/SC monitor did not start")
        unsubscribe = backend.subscribe(on_cards)
        try:
            for _ in range(stalls):
                card = VirtualCard(uid=uid, key=key, fault="stall", fault_ins=INS_GENERAL_AUTHENTICATE)
                present.clear()
                card.insert()
                try:
                    if not present.wait(5):
                        raise RuntimeError("pcscd did not report the card inserted within 5 s")
                    out = io.StringIO()
                    began = time.perf_counter()
                    code = PamHelper(config, terminal, env, out).run()
                    timings.append(time.perf_counter() - began)
                    if code == 0 or message("card_timeout", "en") not in out.getvalue() or card.stall_answered.is_set():
                        raise RuntimeError(f"the stalled card was not refused as card_timeout: {out.getvalue()!r}")
                finally:
                    absent.clear()
                    card.remove()
                # The next card must be a new insertion pcscd sees on its own.
                if not absent.wait(5):
                    raise RuntimeError("pcscd did not report the card removed within 5 s")
        finally:
            unsubscribe()
    outbox = Outbox(state / "outbox.sqlite3", signing_key=signing.generate_key(), agent_id=agent)
    try:
        reasons = [
            events.decode_event(raw, topic_agent=agent).payload.get("reason")
            for _, raw in outbox.pending(limit=100_000)
        ]
    finally:
        outbox.close()
    if reasons != ["card_timeout"] * stalls:
        raise RuntimeError(f"expected {stalls} card_timeout refusals recorded, found {reasons}")
    return timings, LoginAgentSettings().card_timeout_s


def _wrapper(path: Path, config: Path, command: str) -> Path:
    """Write deploy/pam/sekisho-pam-auth as install-pam.sh fills it in, its last command replaced by ``command``."""
    import sekisho.deploy

    template = (Path(sekisho.deploy.__file__).parent / "pam" / "sekisho-pam-auth").read_text()
    shipped = '-I -m sekisho.agents.login pam-auth --config "$CONFIG" --terminal "$TERMINAL"'
    if shipped not in template:
        raise RuntimeError("deploy/pam/sekisho-pam-auth no longer ends in the command the benchmark replaces")
    text = template.replace("@VENV@", sys.prefix).replace("@CONFIG@", str(config)).replace("@TERMINAL@", TERMINAL)
    path.write_text(text.replace(shipped, command))
    path.chmod(0o755)
    return path


def _pam_whole(logins: int, workdir: Path) -> tuple[list[float], list[float]]:
    """Time ``logins`` whole PAM auth calls as pam_exec makes them, each against the old in-process helper.

    Each call runs the installed wrapper (deploy/pam/sekisho-pam-auth: sh, ``env -i``, a new Python) with the
    PAM variables, from its start until it has exited: ``pam-auth`` asks ``PamService`` — running in this
    process as in ``sekisho-agent terminal`` — which reads the signed policy, runs the card's challenge–response
    through pcscd and vpcd, takes the finger, writes the signed ``login.granted`` and answers. The baseline, in
    turn with it, is the same wrapper running ``sekisho/bench/login_inprocess.py``: what ``pam-auth`` was, the
    whole decision in a new process. The finger: a stand-in sensor that matches as soon as it is asked (no fprintd);
    the time spent in the finger step is measured where it runs and subtracted from each call. Returns
    (agent path, in-process baseline) in seconds.
    """
    from cryptography.hazmat.primitives.asymmetric import ec

    from sekisho.agents.login.messages import message
    from sekisho.agents.login.pam_service import PamService
    from sekisho.bench import login_inprocess
    from sekisho.bench.login_inprocess import FINGER_MARK, bench_hardware
    from sekisho.drivers.smartcard.pcsc import PcscBackend
    from sekisho.firmware_stubs.piv_card import VirtualCard

    uid = bytes.fromhex("04BE7C4000AA03")
    key = ec.generate_private_key(ec.SECP256R1())
    config, _ = _bench_agent(workdir, uid, key)
    socket_path = workdir / "pam" / "pam.sock"
    agent_path = _wrapper(
        workdir / "sekisho-pam-auth",
        config,
        f'-I -m sekisho.agents.login pam-auth --config "$CONFIG" --terminal "$TERMINAL" --socket {socket_path}',
    )
    old_path = _wrapper(
        workdir / "sekisho-pam-auth-inprocess",
        config,
        f'-I {login_inprocess.__file__} --config "$CONFIG" --terminal "$TERMINAL"',
    )
    env = {"PAM_USER": "bench", "PAM_TYPE": "auth", "PAM_SERVICE": "bench"}
    agent_fingers: list[float] = []
    whole: dict[Path, list[float]] = {agent_path: [], old_path: []}
    present = threading.Event()

    def on_cards(event: CardEvent) -> None:
        if any(c.reader == VPCD_READER for c in event.added):
            present.set()

    service = PamService(config, TERMINAL, socket_path=socket_path, hardware=bench_hardware(agent_fingers.append))
    with PcscBackend() as backend, VirtualCard(uid=uid, key=key), service:
        unsubscribe = backend.subscribe(on_cards)
        try:
            if not present.wait(5):
                raise RuntimeError("pcscd did not report the card inserted within 5 s")
            for _ in range(logins):
                for wrapper in (agent_path, old_path):
                    began = time.perf_counter()
                    done = subprocess.run(
                        [str(wrapper)], env=env, capture_output=True, text=True, timeout=60, check=False
                    )
                    elapsed = time.perf_counter() - began
                    if done.returncode != 0 or message("granted", "en") not in done.stdout:
                        raise RuntimeError(f"{wrapper.name}: the bench login was refused: {done.stdout}{done.stderr}")
                    if wrapper == agent_path:
                        finger = agent_fingers.pop()
                    else:
                        marks = [line for line in done.stderr.splitlines() if line.startswith(FINGER_MARK)]
                        finger = float(marks[-1].removeprefix(FINGER_MARK))
                    whole[wrapper].append(elapsed - finger)
        finally:
            unsubscribe()
    return whole[agent_path], whole[old_path]


def run_login_bench(removals: int, console: Console, iterations: int = 200, stalls: int = 20, logins: int = 30) -> int:
    """Run the measurements, print a table and the JSON summary line; return the exit status."""
    unavailable = pcscd_unavailable()
    if unavailable is not None:
        console.print(f"login bench needs the real pcscd with vpcd: {unavailable}")
        return 2
    with tempfile.TemporaryDirectory(prefix="sekisho-bench-login-") as tmp, own_pcscd():
        detect_s, lock_s, overhead_s = _removal_to_lock(removals, Path(tmp))
        stalled_s, deadline_s = _stalled_refusals(stalls, Path(tmp))
        (Path(tmp) / "whole").mkdir()
        whole_s, inprocess_s = _pam_whole(logins, Path(tmp) / "whole")
    pam_s = _pam_decision(iterations)
    figures = {
        "removal_detected_p50_ms": round(_percentile(detect_s, 50) * 1000, 2),
        "removal_detected_p95_ms": round(_percentile(detect_s, 95) * 1000, 2),
        "removal_to_lock_p50_ms": round(_percentile(lock_s, 50) * 1000, 2),
        "removal_to_lock_p95_ms": round(_percentile(lock_s, 95) * 1000, 2),
        "removal_overhead_p50_ms": round(_percentile(overhead_s, 50) * 1000, 2),
        "removal_overhead_p99_ms": round(_percentile(overhead_s, 99) * 1000, 2),
        "pam_whole_p50_ms": round(_percentile(whole_s, 50) * 1000, 2),
        "pam_whole_p95_ms": round(_percentile(whole_s, 95) * 1000, 2),
        "pam_whole_inprocess_p50_ms": round(_percentile(inprocess_s, 50) * 1000, 2),
        "pam_whole_inprocess_p95_ms": round(_percentile(inprocess_s, 95) * 1000, 2),
        "pam_decision_p95_ms": round(_percentile(pam_s, 95) * 1000, 2),
        "stalled_card_refusal_p99_ms": round(_percentile(stalled_s, 99) * 1000, 2),
        "stalled_card_deadline_ms": round(deadline_s * 1000, 2),
    }
    table = Table(title="terminal login guard")
    for column in ("measurement", "samples", "p50 ms", "p95 ms", "p99 ms", "max ms"):
        table.add_column(column)
    for name, values in (
        ("card removal → reported by PcscBackend", detect_s),
        ("card removal → lock command started", lock_s),
        ("removal reported → lock command started (guard)", overhead_s),
        ("whole PAM auth: pam-auth → agent (finger out)", whole_s),
        ("baseline: whole PAM auth decided in-process", inprocess_s),
        ("PAM decision (no human)", pam_s),
        (f"PAM refusal, card stalled (deadline {deadline_s:g} s)", stalled_s),
    ):
        table.add_row(
            name,
            str(len(values)),
            f"{_percentile(values, 50) * 1000:.2f}",
            f"{_percentile(values, 95) * 1000:.2f}",
            f"{_percentile(values, 99) * 1000:.2f}",
            f"{max(values) * 1000:.2f}",
        )
    console.print(table)
    print(json.dumps(figures))
    return 0
