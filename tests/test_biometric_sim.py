"""The simulated fingerprint backend and the verification rules it shares with the fprintd backend."""

from __future__ import annotations

import threading
import time

import pytest

from sekisho.drivers.biometric import (
    DeviceBusy,
    FingerprintBackend,
    NoSensor,
    NotEnrolled,
    SimulatedFingerprint,
    VerifyResult,
)
from sekisho.drivers.biometric.session import Step, VerifyTally

pytestmark = pytest.mark.timeout(30)

# Short enough to keep the suite quick, long enough that a scripted touch is never late.
SHORT = 0.05
LONG = 5.0


def verify(backend: FingerprintBackend, user: str, *, timeout_s: float, max_attempts: int = 3) -> VerifyResult:
    """Call verify through the protocol type, as the login guard will (mypy checks the simulator fits it)."""
    return backend.verify(user, timeout_s=timeout_s, max_attempts=max_attempts)


@pytest.fixture
def sensor() -> SimulatedFingerprint:
    """A simulated sensor with alice's right index finger enrolled."""
    return SimulatedFingerprint({"alice": ["alice-finger"]})


def test_enrolled_is_yes_or_no(sensor: SimulatedFingerprint) -> None:
    """Enrolled users say yes, everyone else no; enrolment changes are seen at once."""
    assert sensor.enrolled("alice") is True
    assert sensor.enrolled("bob") is False
    sensor.enroll("bob", "bob-finger")
    assert sensor.enrolled("bob") is True
    sensor.delete_enrolment("bob")
    assert sensor.enrolled("bob") is False


def test_match_on_first_touch(sensor: SimulatedFingerprint) -> None:
    """The enrolled finger matches in one attempt and the sensor is released."""
    sensor.touch("alice-finger")
    seen: list[str] = []
    result = sensor.verify("alice", timeout_s=LONG, max_attempts=1, on_status=seen.append)
    assert (result.outcome, result.attempts, result.matched) == ("match", 1, True)
    assert seen == ["ready", "verify-match"]
    assert not sensor.claimed


def test_other_finger_is_no_match(sensor: SimulatedFingerprint) -> None:
    """Another finger is a no_match."""
    sensor.touch("mallory")
    result = verify(sensor, "alice", timeout_s=LONG, max_attempts=1)
    assert (result.outcome, result.attempts) == ("no_match", 1)


def test_retry_then_match(sensor: SimulatedFingerprint) -> None:
    """A mismatch with attempts left restarts; the right finger then matches on attempt two."""
    sensor.touch("mallory")
    sensor.touch("alice-finger")
    seen: list[str] = []
    result = sensor.verify("alice", timeout_s=LONG, max_attempts=3, on_status=seen.append)
    assert (result.outcome, result.attempts) == ("match", 2)
    assert seen == ["ready", "verify-no-match", "ready", "verify-match"]


def test_attempts_are_capped(sensor: SimulatedFingerprint) -> None:
    """No more touches are consumed than max_attempts."""
    for _ in range(3):
        sensor.touch("mallory")
    result = verify(sensor, "alice", timeout_s=LONG, max_attempts=2)
    assert (result.outcome, result.attempts) == ("no_match", 2)
    assert sensor.pending_touches == 1


def test_unreadable_scans_exhaust_attempts(sensor: SimulatedFingerprint) -> None:
    """Only unreadable scans: retry_exhausted, not no_match."""
    sensor.report("verify-retry-scan", done=False)
    sensor.report("verify-finger-not-centered", done=False)
    result = verify(sensor, "alice", timeout_s=LONG, max_attempts=2)
    assert (result.outcome, result.attempts) == ("retry_exhausted", 2)


def test_unreadable_then_match(sensor: SimulatedFingerprint) -> None:
    """An unreadable scan uses an attempt but the same verification goes on to match."""
    sensor.report("verify-swipe-too-short", done=False)
    sensor.touch("alice-finger")
    result = verify(sensor, "alice", timeout_s=LONG, max_attempts=3)
    assert (result.outcome, result.attempts) == ("match", 2)


def test_timeout_without_touch_releases(sensor: SimulatedFingerprint) -> None:
    """No touch: timeout after about timeout_s, and the sensor is free again."""
    started = time.monotonic()
    result = verify(sensor, "alice", timeout_s=SHORT, max_attempts=3)
    assert (result.outcome, result.attempts) == ("timeout", 0)
    assert SHORT <= time.monotonic() - started < LONG
    assert not sensor.claimed


def test_touch_from_another_thread_is_seen(sensor: SimulatedFingerprint) -> None:
    """A touch arriving while verify waits wakes it (the demo drives the sensor from another thread)."""
    ready = threading.Event()

    def touch_when_ready() -> None:
        if ready.wait(LONG):
            sensor.touch("alice-finger")

    toucher = threading.Thread(target=touch_when_ready)
    toucher.start()
    result = sensor.verify("alice", timeout_s=LONG, max_attempts=1, on_status=lambda s: ready.set())
    toucher.join(LONG)
    assert result.outcome == "match"


@pytest.mark.parametrize(
    ("status", "done", "outcome"),
    [
        ("verify-disconnected", True, "unavailable"),
        ("verify-unknown-error", True, "unavailable"),
        ("verify-match-ish", True, "unavailable"),
        ("", True, "unavailable"),
        ("\x00" * 1000, True, "unavailable"),
    ],
)
def test_errors_and_garbage_fail_closed(sensor: SimulatedFingerprint, status: str, done: bool, outcome: str) -> None:
    """Disconnects, errors and unknown final statuses are unavailable — never a match — and release the sensor."""
    sensor.report(status, done)
    result = verify(sensor, "alice", timeout_s=LONG, max_attempts=3)
    assert result.outcome == outcome
    assert result.error is not None
    assert len(result.detail) < 200  # a hostile value is quoted, capped
    assert not sensor.claimed


def test_unknown_interim_status_is_ignored(sensor: SimulatedFingerprint) -> None:
    """An unknown status with done=False is skipped without counting an attempt."""
    sensor.report("verify-sparkles", done=False)
    sensor.touch("alice-finger")
    result = verify(sensor, "alice", timeout_s=LONG, max_attempts=1)
    assert (result.outcome, result.attempts) == ("match", 1)


def test_switched_off_is_unavailable(sensor: SimulatedFingerprint) -> None:
    """No sensor: verify reports unavailable with NoSensor, enrolled raises NoSensor."""
    sensor.available = False
    result = verify(sensor, "alice", timeout_s=LONG)
    assert result.outcome == "unavailable" and isinstance(result.error, NoSensor)
    with pytest.raises(NoSensor):
        sensor.enrolled("alice")


def test_busy_sensor_is_unavailable(sensor: SimulatedFingerprint) -> None:
    """A sensor claimed by someone else: unavailable with DeviceBusy; the other claim is left alone."""
    sensor.hold_claim()
    result = verify(sensor, "alice", timeout_s=LONG)
    assert result.outcome == "unavailable" and isinstance(result.error, DeviceBusy)
    assert sensor.claimed
    sensor.release_claim()
    sensor.touch("alice-finger")
    assert verify(sensor, "alice", timeout_s=LONG).outcome == "match"


def test_not_enrolled_is_unavailable(sensor: SimulatedFingerprint) -> None:
    """Verifying a user with no prints: unavailable with NotEnrolled, no touch consumed."""
    sensor.touch("bob-finger")
    result = verify(sensor, "bob", timeout_s=LONG)
    assert result.outcome == "unavailable" and isinstance(result.error, NotEnrolled)
    assert sensor.pending_touches == 1


def test_failing_observer_does_not_break_verification(sensor: SimulatedFingerprint) -> None:
    """An observer that raises is logged; the verification still completes and releases."""

    def explode(status: str) -> None:
        raise RuntimeError("ui went away")

    sensor.touch("alice-finger")
    result = sensor.verify("alice", timeout_s=LONG, max_attempts=1, on_status=explode)
    assert result.outcome == "match"
    assert not sensor.claimed


def test_tally_rejects_zero_attempts() -> None:
    """max_attempts below one is a programming error, refused up front."""
    with pytest.raises(ValueError, match="max_attempts"):
        VerifyTally(0)


def test_tally_mixed_mismatch_and_unreadable_reports_no_match() -> None:
    """A mismatch anywhere in the run is the fact reported, even if the last scan was unreadable."""
    tally = VerifyTally(2)
    assert tally.feed("verify-no-match", True) is Step.RESTART
    assert tally.feed("verify-retry-scan", False) is Step.FINISH
    assert tally.result is not None and tally.result.outcome == "no_match"


def test_tally_ignores_statuses_after_finish() -> None:
    """Once decided, later statuses (a late match) cannot change the outcome."""
    tally = VerifyTally(1)
    tally.feed("verify-no-match", True)
    assert tally.feed("verify-match", True) is Step.FINISH
    assert tally.result is not None and tally.result.outcome == "no_match"
    assert tally.timed_out().outcome == "no_match"
