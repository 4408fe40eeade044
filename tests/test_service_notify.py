"""sd_notify: the real agent and controller processes tell a listening service manager READY, WATCHDOG, STOPPING."""

from __future__ import annotations

import logging
import os
import secrets
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.lab import lab_on

from sekisho.common.i18n import _
from sekisho.common.sdnotify import LivenessCheck, ServiceNotifier
from sekisho.lab import Lab

WAIT = 30.0


class NotifyListener:
    """A bound Unix datagram socket standing in for systemd's notification socket."""

    def __init__(self, address: str) -> None:
        self.env_value = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.received: list[dict[str, str]] = []

    def close(self) -> None:
        """Close the socket."""
        self.sock.close()

    def next(self, timeout: float = WAIT) -> dict[str, str]:
        """Return the next notification as {KEY: value}; fail the test if none comes in time."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(4096)
        except TimeoutError:
            raise AssertionError(f"no notification within {timeout}s (so far: {self.received})") from None
        fields = dict(line.split("=", 1) for line in data.decode().split("\n") if line)
        self.received.append(fields)
        return fields

    def wait_for(self, key: str, timeout: float = WAIT) -> dict[str, str]:
        """Return the first notification carrying ``key``."""
        deadline = time.monotonic() + timeout
        while True:
            fields = self.next(max(0.1, deadline - time.monotonic()))
            if key in fields:
                return fields


@pytest.fixture(params=["abstract", "path"])
def listener(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[NotifyListener]:
    """A notification socket in the abstract namespace ('@name') or at a path, as systemd may pass either."""
    address = f"@sekisho-test-{secrets.token_hex(6)}" if request.param == "abstract" else str(tmp_path / "notify")
    got = NotifyListener(address)
    try:
        yield got
    finally:
        got.close()


class FakeClock:
    """A monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_without_notify_socket_every_call_is_a_no_op() -> None:
    notifier = ServiceNotifier({})
    assert not notifier.enabled
    assert notifier.ready("x") is False
    assert notifier.keepalive() is False
    assert notifier.stopping() is False
    assert notifier.tick_s() == 1.0


def test_a_notify_socket_that_is_no_unix_address_turns_notifications_off(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        notifier = ServiceNotifier({"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not notifier.enabled
    assert "not a Unix socket address" in caplog.text


def test_ready_status_and_watchdog_at_half_the_interval(listener: NotifyListener) -> None:
    clock = FakeClock()
    notifier = ServiceNotifier({"NOTIFY_SOCKET": listener.env_value, "WATCHDOG_USEC": "10000000"}, clock=clock)
    assert notifier.watchdog_s == 10.0
    assert notifier.ready("starting") is True
    assert listener.next() == {"READY": "1", "STATUS": "starting"}
    clock.now += 4.9
    assert notifier.keepalive() is False  # not due before half of WatchdogSec
    clock.now += 0.1
    assert notifier.keepalive() is True
    assert listener.next() == {"WATCHDOG": "1"}
    assert notifier.status("starting") is False  # unchanged: not sent again
    assert notifier.status("connected") is True
    assert listener.next() == {"STATUS": "connected"}
    assert notifier.stopping() is True
    assert listener.next() == {"STOPPING": "1"}


def test_the_watchdog_of_another_process_is_not_ours(listener: NotifyListener) -> None:
    env = {"NOTIFY_SOCKET": listener.env_value, "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid() + 1)}
    assert ServiceNotifier(env).watchdog_s is None
    env["WATCHDOG_PID"] = str(os.getpid())
    assert ServiceNotifier(env).watchdog_s == 1.0


def test_a_dead_thread_stops_the_watchdog_pings_and_says_so(listener: NotifyListener) -> None:
    clock = FakeClock()
    notifier = ServiceNotifier({"NOTIFY_SOCKET": listener.env_value, "WATCHDOG_USEC": "2000000"}, clock=clock)
    alive = [True]
    check = LivenessCheck(notifier, lambda: alive[0], lambda: "ok")
    check.ready()
    assert listener.next() == {"READY": "1", "STATUS": "ok"}
    clock.now += 1.0
    check.check()
    assert listener.next() == {"WATCHDOG": "1"}
    alive[0] = False
    clock.now += 5.0
    check.check()
    # The next datagram is the unhealthy status, not a ping: systemd's watchdog will now restart the service.
    # In the process's language (Japanese unless SEKISHO_LANG/LANG say en): 異常: 処理スレッドが停止.
    assert listener.next()["STATUS"] == _("unhealthy: a working thread stopped")
    clock.now += 5.0
    check.check()
    notifier.stopping()
    assert listener.next() == {"STOPPING": "1"}


def test_a_vanished_socket_is_logged_once_and_never_raises(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    notifier = ServiceNotifier({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    with caplog.at_level(logging.WARNING):
        assert notifier.ready() is False
        assert notifier.stopping() is False
    assert caplog.text.count("service notification failed") == 1


def _notify_env(listener: NotifyListener, watchdog_usec: int = 400_000) -> dict[str, str]:
    return {"NOTIFY_SOCKET": listener.env_value, "WATCHDOG_USEC": str(watchdog_usec)}


def _stop(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=WAIT)


@pytest.fixture
def lab(pki: Path, tmp_path: Path) -> Iterator[Lab]:
    """A site on the session PKI with a running broker and a controller config (nothing else running)."""
    site = lab_on(pki, tmp_path / "site")
    site.start_broker()
    site.write_controller_config()
    try:
        yield site
    finally:
        site.stop_all()


@pytest.mark.broker
def test_agent_run_is_ready_pings_the_watchdog_and_says_stopping(lab: Lab, listener: NotifyListener) -> None:
    config = lab.add_agent("notify-agent")
    proc = lab.spawn("agent", "run", "--config", str(config), log_name="agent", env=_notify_env(listener))
    ready = listener.wait_for("READY")
    assert ready["READY"] == "1" and "送信待ち" in ready["STATUS"]  # the process language (conftest: ja)
    # WatchdogSec 0.4 s: pinged every 0.2 s by the liveness loop while the agent's threads run.
    assert listener.wait_for("WATCHDOG", timeout=5)["WATCHDOG"] == "1"
    assert listener.wait_for("WATCHDOG", timeout=5)["WATCHDOG"] == "1"
    # Started before the broker answered; the status follows the link.
    statuses = [fields["STATUS"] for fields in listener.received if "STATUS" in fields]
    while not any(status.startswith("接続中; 送信待ち") for status in statuses):
        statuses.append(listener.wait_for("STATUS")["STATUS"])
    assert _stop(proc) == 0
    assert listener.wait_for("STOPPING", timeout=5)["STOPPING"] == "1"


@pytest.mark.broker
def test_controller_serve_is_ready_only_once_http_answers(lab: Lab, listener: NotifyListener) -> None:
    proc = lab.spawn(
        "controller", "serve", "--config", str(lab.controller_config), log_name="serve", env=_notify_env(listener)
    )
    ready = listener.wait_for("READY", timeout=60)
    assert ready["STATUS"].startswith("接続中; 保存 "), ready["STATUS"]
    # READY=1 came after the socket was listening: the API answers at once, no retry needed.
    with urllib.request.urlopen(f"http://127.0.0.1:{lab.http_port}/healthz", timeout=5) as response:
        assert response.status == 200
    assert listener.wait_for("WATCHDOG", timeout=5)["WATCHDOG"] == "1"
    # Exit 0: uvicorn's re-raised SIGTERM no longer kills the process before the ingest worker is stopped.
    assert _stop(proc) == 0
    assert listener.wait_for("STOPPING", timeout=10)["STOPPING"] == "1"
    assert "controller controller-1 stopped" in (lab.root / "logs" / "serve.log").read_text()


@pytest.mark.broker
def test_controller_ingest_is_ready_once_connected(lab: Lab, listener: NotifyListener) -> None:
    proc = lab.spawn(
        "controller",
        "ingest",
        "--config",
        str(lab.controller_config),
        log_name="ingest",
        env={**_notify_env(listener), "SEKISHO_CONTROLLER_WORKER_ID": "controller-2"},
    )
    ready = listener.wait_for("READY", timeout=60)
    assert ready["STATUS"].startswith("接続中; 保存 "), ready["STATUS"]
    assert listener.wait_for("WATCHDOG", timeout=5)["WATCHDOG"] == "1"
    assert _stop(proc) == 0
    assert listener.wait_for("STOPPING", timeout=10)["STOPPING"] == "1"
