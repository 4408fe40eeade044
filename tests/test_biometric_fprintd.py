"""The fprintd backend against the real fprintd with libfprint's virtual_device, on a private system bus."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from support.fprintd import FakeFprintd, FprintdStack, missing_prerequisites

_MISSING = missing_prerequisites()
if _MISSING is not None:
    print(f"SKIP tests/test_biometric_fprintd.py: {_MISSING}", file=sys.stderr)
    pytest.skip(_MISSING, allow_module_level=True)
pytest.importorskip("jeepney", reason="jeepney (the agent extra) is not installed in this venv")

from sekisho.drivers.biometric import DeviceBusy, NoSensor, NotEnrolled  # noqa: E402 - after the skip checks
from sekisho.drivers.biometric.fprintd import FprintdBackend  # noqa: E402
from sekisho.drivers.biometric.session import RETRY_RESULTS  # noqa: E402

pytestmark = pytest.mark.timeout(120)

ALICE_FINGER = "alice-finger"
DEVICE_PATH = "/net/reactivated/Fprint/Device/0"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FprintdStack]:
    """One fprintd on a private bus for the module, with alice enrolled by five touches."""
    with FprintdStack(tmp_path_factory.mktemp("fp")) as running:
        running.enroll("alice", ALICE_FINGER)
        yield running


@pytest.fixture
def backend(stack: FprintdStack) -> FprintdBackend:
    """A backend pointed at the private bus only (the process environment is left alone)."""
    return FprintdBackend(bus_address=stack.address, call_timeout_s=5.0)


@dataclass
class SensorScript:
    """Touches the virtual sensor each time the backend waits for a finger; records what it saw."""

    stack: FprintdStack
    commands: list[str]
    statuses: list[str] = field(default_factory=list)
    last_touch: float | None = None
    finished_at: float | None = None

    def __call__(self, status: str) -> None:
        """Observe one status: on "ready" or an unreadable scan, send the next scripted command."""
        self.statuses.append(status)
        if status == "ready" or status in RETRY_RESULTS:
            if self.commands:
                self.last_touch = time.monotonic()
                self.stack.send_device_command(self.commands.pop(0))
        else:
            self.finished_at = time.monotonic()


def assert_sensor_free(stack: FprintdStack, backend: FprintdBackend) -> None:
    """Check that the sensor was given back: an immediate new verification claims it and matches."""
    script = SensorScript(stack, [f"SCAN {ALICE_FINGER}"])
    again = backend.verify("alice", timeout_s=10, max_attempts=1, on_status=script)
    assert again.outcome == "match", again


def test_enrolled_answers_yes_or_no(backend: FprintdBackend) -> None:
    """Enrolled users say yes, unknown users say no — never an exception for "no prints"."""
    assert backend.enrolled("alice") is True
    assert backend.enrolled("bob") is False


def test_verify_matches_the_enrolled_finger(stack: FprintdStack, backend: FprintdBackend) -> None:
    """The enrolled finger matches on the first attempt."""
    script = SensorScript(stack, [f"SCAN {ALICE_FINGER}"])
    result = backend.verify("alice", timeout_s=10, max_attempts=1, on_status=script)
    assert result.outcome == "match", result
    assert result.matched and result.attempts == 1 and result.error is None
    assert script.statuses == ["ready", "verify-match"]
    assert script.last_touch is not None and script.finished_at is not None
    print(f"fprintd verify, scan to match: {(script.finished_at - script.last_touch) * 1000:.1f} ms")


def test_verify_refuses_another_finger(stack: FprintdStack, backend: FprintdBackend) -> None:
    """Somebody else's finger is a no_match."""
    script = SensorScript(stack, ["SCAN mallory"])
    result = backend.verify("alice", timeout_s=10, max_attempts=1, on_status=script)
    assert (result.outcome, result.attempts) == ("no_match", 1), result
    assert not result.matched


def test_verify_retries_after_a_mismatch(stack: FprintdStack, backend: FprintdBackend) -> None:
    """With attempts left, a mismatch restarts the verification and the right finger then matches."""
    script = SensorScript(stack, ["SCAN mallory", f"SCAN {ALICE_FINGER}"])
    result = backend.verify("alice", timeout_s=10, max_attempts=3, on_status=script)
    assert (result.outcome, result.attempts) == ("match", 2), result
    assert script.statuses == ["ready", "verify-no-match", "ready", "verify-match"]


def test_verify_gives_up_after_max_attempts(stack: FprintdStack, backend: FprintdBackend) -> None:
    """Mismatches on every attempt end in no_match after exactly max_attempts scans."""
    script = SensorScript(stack, ["SCAN mallory", "SCAN mallory", f"SCAN {ALICE_FINGER}"])
    result = backend.verify("alice", timeout_s=10, max_attempts=2, on_status=script)
    assert (result.outcome, result.attempts) == ("no_match", 2), result
    assert script.commands == [f"SCAN {ALICE_FINGER}"]  # the third touch was never asked for


def test_unreadable_scans_exhaust_the_attempts(stack: FprintdStack, backend: FprintdBackend) -> None:
    """Scans the sensor cannot read (libfprint retry errors) count as attempts and end in retry_exhausted."""
    # RETRY 0 / RETRY 1: FP_DEVICE_RETRY_GENERAL / _TOO_SHORT, reported by fprintd with done=False.
    script = SensorScript(stack, ["RETRY 0", "RETRY 1"])
    result = backend.verify("alice", timeout_s=10, max_attempts=2, on_status=script)
    assert (result.outcome, result.attempts) == ("retry_exhausted", 2), result
    assert script.statuses == ["ready", "verify-retry-scan", "verify-swipe-too-short"]
    assert_sensor_free(stack, backend)


def test_timeout_releases_the_sensor(stack: FprintdStack, backend: FprintdBackend) -> None:
    """No finger within the timeout is a timeout, and the sensor is free for the very next login."""
    started = time.monotonic()
    result = backend.verify("alice", timeout_s=0.5, max_attempts=3)
    waited = time.monotonic() - started
    assert (result.outcome, result.attempts) == ("timeout", 0), result
    assert 0.5 <= waited < 5, waited
    assert_sensor_free(stack, backend)


def test_sensor_error_is_unavailable_and_released(stack: FprintdStack, backend: FprintdBackend) -> None:
    """A device error during the scan (verify-unknown-error) fails closed and still gives the sensor back."""
    result = backend.verify("alice", timeout_s=10, max_attempts=3, on_status=SensorScript(stack, ["ERROR 0"]))
    assert result.outcome == "unavailable", result
    assert "unknown error" in result.detail
    assert_sensor_free(stack, backend)


def test_user_without_prints_is_unavailable_not_a_crash(stack: FprintdStack, backend: FprintdBackend) -> None:
    """Verifying a user with no prints reports NotEnrolled with fprintd's error name, and releases the sensor."""
    result = backend.verify("bob", timeout_s=5)
    assert result.outcome == "unavailable", result
    assert isinstance(result.error, NotEnrolled)
    assert result.error.error_name == "net.reactivated.Fprint.Error.NoEnrolledPrints"
    assert_sensor_free(stack, backend)


def test_second_client_finds_the_sensor_busy(stack: FprintdStack, backend: FprintdBackend) -> None:
    """While one verification holds the claim, another client gets DeviceBusy (AlreadyInUse)."""
    holder_ready = threading.Event()
    holder_result: list[object] = []

    def hold(status: str) -> None:
        if status == "ready":
            holder_ready.set()

    def run_holder() -> None:
        holder_result.append(backend.verify("alice", timeout_s=10, max_attempts=1, on_status=hold))

    holder = threading.Thread(target=run_holder)
    holder.start()
    try:
        assert holder_ready.wait(10), "the first verification never started"
        other = FprintdBackend(bus_address=stack.address).verify("alice", timeout_s=5)
        assert other.outcome == "unavailable", other
        assert isinstance(other.error, DeviceBusy)
        assert other.error.error_name == "net.reactivated.Fprint.Error.AlreadyInUse"
    finally:
        stack.scan(ALICE_FINGER)
        holder.join(15)
    assert not holder.is_alive()
    assert getattr(holder_result[0], "outcome", None) == "match", holder_result


def test_signals_from_other_clients_are_ignored(stack: FprintdStack, backend: FprintdBackend) -> None:
    """A forged "verify-match" or garbage VerifyStatus from a non-fprintd connection changes nothing."""

    def forge(status: str) -> None:
        if status == "ready":
            for value in ("verify-match", "\x7fgarbage", ""):
                stack.emit(DEVICE_PATH, "net.reactivated.Fprint.Device.VerifyStatus", f"string:{value}", "boolean:true")

    result = backend.verify("alice", timeout_s=1.0, max_attempts=3, on_status=forge)
    assert (result.outcome, result.attempts) == ("timeout", 0), result


def test_fprintd_stopped_is_unavailable_then_recovers(tmp_path: Path) -> None:
    """With fprintd gone, verify reports why and enrolled raises NoSensor; after a restart both work again."""
    with FprintdStack(tmp_path / "fp") as stack:
        stack.enroll("alice", ALICE_FINGER)
        backend = FprintdBackend(bus_address=stack.address, call_timeout_s=2.0)
        stack.stop_fprintd()
        result = backend.verify("alice", timeout_s=5)
        assert result.outcome == "unavailable", result
        assert isinstance(result.error, NoSensor)
        assert "fprintd is not running" in result.detail
        with pytest.raises(NoSensor) as caught:
            backend.enrolled("alice")
        assert caught.value.error_name is not None and caught.value.error_name.startswith("org.freedesktop.DBus.Error")
        stack.start_fprintd()
        assert backend.enrolled("alice") is True
        script = SensorScript(stack, [f"SCAN {ALICE_FINGER}"])
        assert backend.verify("alice", timeout_s=10, max_attempts=1, on_status=script).outcome == "match"


def test_no_bus_is_unavailable(tmp_path: Path) -> None:
    """No system bus at the address at all: unavailable with the reason, and enrolled raises NoSensor."""
    backend = FprintdBackend(bus_address=f"unix:path={tmp_path / 'nobus'}", call_timeout_s=1.0)
    result = backend.verify("alice", timeout_s=1)
    assert result.outcome == "unavailable", result
    assert isinstance(result.error, NoSensor)
    assert "cannot connect" in result.detail
    with pytest.raises(NoSensor):
        backend.enrolled("alice")


@pytest.mark.parametrize(
    ("statuses", "expected"),
    [
        # A value outside fprintd's list that claims to be final: fail closed.
        ([("sb", ["verify-definitely-a-match", True])], "unexpected verify status"),
        # Arguments of the wrong types: treated as a malformed, final status.
        ([("ii", [1, 2])], "malformed VerifyStatus body"),
        ([("s", ["verify-match"])], "malformed VerifyStatus body"),
    ],
)
def test_garbage_verify_status_from_the_service_fails_closed(
    tmp_path: Path, statuses: list[tuple[str, list[object]]], expected: str
) -> None:
    """Nonsense from the owner of net.reactivated.Fprint is never a match: unavailable, with the value quoted."""
    with FakeFprintd(tmp_path / "fake", statuses) as fake:
        result = FprintdBackend(bus_address=fake.address).verify("alice", timeout_s=5, max_attempts=3)
    assert result.outcome == "unavailable", result
    assert expected in result.detail


def test_unknown_interim_status_is_ignored_until_timeout(tmp_path: Path) -> None:
    """An unknown status with done=False is skipped (no attempt counted); without a real result it times out."""
    with FakeFprintd(tmp_path / "fake", [("sb", ["verify-sparkles", False])]) as fake:
        seen: list[str] = []
        result = FprintdBackend(bus_address=fake.address).verify(
            "alice", timeout_s=0.5, max_attempts=3, on_status=seen.append
        )
    assert (result.outcome, result.attempts) == ("timeout", 0), result
    assert seen == ["ready", "verify-sparkles"]


def test_unknown_interim_status_then_match_from_the_service(tmp_path: Path) -> None:
    """An ignored unknown interim status does not stop a following genuine match."""
    statuses: list[tuple[str, list[object]]] = [("sb", ["verify-sparkles", False]), ("sb", ["verify-match", True])]
    with FakeFprintd(tmp_path / "fake", statuses) as fake:
        result = FprintdBackend(bus_address=fake.address).verify("alice", timeout_s=5, max_attempts=3)
    assert (result.outcome, result.attempts) == ("match", 1), result
