"""The policy cache: only a verified, fresh, newer bundle for this agent becomes the policy in force."""

from __future__ import annotations

import json
import resource
import signal
import threading
from datetime import timedelta
from pathlib import Path

import pytest

from sekisho.agents.runtime.policy_cache import CACHE_NAME, PolicyCache, PolicyChange
from sekisho.common.files import write_atomically
from sekisho.protocol import errors, messages, signing, timefmt

AGENT = "door-001"


@pytest.fixture(scope="module")
def ctl_key():
    return signing.generate_key()


def bundle(key, version: int, *, agent: str = AGENT, lifetime: timedelta = timedelta(hours=1), **kw) -> bytes:
    return messages.build_bundle(
        key, agent=agent, version=version, policy={"doors": [f"d{version}"]}, lifetime=lifetime, **kw
    )


def cache(tmp_path: Path, ctl_key, **kw) -> PolicyCache:
    return PolicyCache(tmp_path, ctl_key.public_key(), AGENT, **kw)


def test_starts_with_no_policy(tmp_path: Path, ctl_key) -> None:
    c = cache(tmp_path, ctl_key)
    assert (c.state(), c.current(), c.in_force(), c.version, c.load_error) == ("none", None, None, None, None)


def test_valid_bundle_is_applied_and_survives_restart(tmp_path: Path, ctl_key) -> None:
    c = cache(tmp_path, ctl_key)
    heard: list[PolicyChange] = []
    c.subscribe(heard.append)
    outcome = c.offer(bundle(ctl_key, 3))
    assert (outcome.status, outcome.version, outcome.previous_version, outcome.accepted) == ("applied", 3, None, True)
    assert c.state() == "valid"
    current = c.in_force()
    assert current is not None and current.bundle.policy == {"doors": ["d3"]}
    assert [(h.kind, h.bundle.bundle.version) for h in heard] == [("applied", 3)]
    assert oct((tmp_path / CACHE_NAME).stat().st_mode & 0o777) == "0o600"

    again = cache(tmp_path, ctl_key)
    assert (again.state(), again.version, again.load_error) == ("valid", 3, None)


def test_same_version_again_is_a_no_op(tmp_path: Path, ctl_key) -> None:
    c = cache(tmp_path, ctl_key)
    raw = bundle(ctl_key, 3)
    c.offer(raw)
    heard: list[PolicyChange] = []
    c.subscribe(heard.append)
    assert c.offer(raw).status == "unchanged"
    assert heard == []


def test_same_version_with_later_expiry_refreshes(tmp_path: Path, ctl_key) -> None:
    c = cache(tmp_path, ctl_key)
    c.offer(bundle(ctl_key, 3, lifetime=timedelta(hours=1)))
    outcome = c.offer(bundle(ctl_key, 3, lifetime=timedelta(hours=5)))
    assert (outcome.status, outcome.version, outcome.previous_version) == ("refreshed", 3, 3)
    assert c.seconds_until_expiry() is not None and c.seconds_until_expiry() > 4 * 3600
    # ...but a re-signed copy that expires sooner changes nothing.
    assert c.offer(bundle(ctl_key, 3, lifetime=timedelta(minutes=5))).status == "unchanged"


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda k: bundle(signing.generate_key(), 5), errors.BAD_SIGNATURE),
        (lambda k: bundle(k, 5, agent="door-002"), errors.WRONG_AGENT),
        (
            lambda k: bundle(k, 5, lifetime=timedelta(minutes=1), issued_at=timefmt.now() - timedelta(hours=1)),
            errors.EXPIRED,
        ),
        (lambda k: bundle(k, 1), errors.ROLLBACK),
        (lambda k: b"{not json", errors.MALFORMED),
        (
            lambda k: json.dumps({**json.loads(bundle(k, 5)), "sig": json.loads(bundle(k, 6))["sig"]}).encode(),
            errors.BAD_SIGNATURE,
        ),
    ],
    ids=["forged", "wrong-agent", "expired", "rollback", "garbage", "tampered"],
)
def test_bad_bundles_are_refused_with_reason_and_change_nothing(tmp_path: Path, ctl_key, make, reason) -> None:
    c = cache(tmp_path, ctl_key)
    c.offer(bundle(ctl_key, 2))
    before = (tmp_path / CACHE_NAME).read_bytes()
    heard: list[PolicyChange] = []
    c.subscribe(heard.append)

    outcome = c.offer(make(ctl_key))

    assert (outcome.status, outcome.reason, outcome.accepted) == ("rejected", reason, False)
    assert outcome.previous_version == 2
    assert c.version == 2 and c.state() == "valid"
    assert (tmp_path / CACHE_NAME).read_bytes() == before
    assert heard == []


def test_expiry_is_reported_once_and_fails_closed(tmp_path: Path, ctl_key) -> None:
    moment = [timefmt.now()]
    c = cache(tmp_path, ctl_key, now=lambda: moment[0])
    c.offer(bundle(ctl_key, 4, lifetime=timedelta(minutes=10)))
    heard: list[PolicyChange] = []
    c.subscribe(heard.append)
    assert c.check_expiry() is None

    moment[0] += timedelta(minutes=11)
    assert c.state() == "expired"
    assert c.in_force() is None
    assert c.current() is not None  # still known, so the version can be reported
    change = c.check_expiry()
    assert change is not None and change.kind == "expired"
    assert c.check_expiry() is None
    assert [h.kind for h in heard] == ["expired"]


def test_expired_cache_at_start_is_kept_but_not_in_force(tmp_path: Path, ctl_key) -> None:
    issued = timefmt.now() - timedelta(hours=2)
    (tmp_path / CACHE_NAME).write_bytes(bundle(ctl_key, 7, lifetime=timedelta(hours=1), issued_at=issued))
    c = cache(tmp_path, ctl_key)
    assert (c.state(), c.version, c.in_force()) == ("expired", 7, None)
    assert c.offer(bundle(ctl_key, 6)).reason == errors.ROLLBACK
    assert c.offer(bundle(ctl_key, 8)).status == "applied"


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", errors.MALFORMED),
        (b"\x00\x01garbage", errors.MALFORMED),
        ("tampered", errors.BAD_SIGNATURE),
        ("other-agent", errors.WRONG_AGENT),
    ],
)
def test_corrupt_cache_file_means_no_policy_with_reason(tmp_path: Path, ctl_key, content, reason) -> None:
    path = tmp_path / CACHE_NAME
    if content == "tampered":
        doc = json.loads(bundle(ctl_key, 9))
        doc["bundle"]["policy"] = {"doors": ["everything"]}
        content = json.dumps(doc).encode()
    elif content == "other-agent":
        content = bundle(ctl_key, 9, agent="door-999")
    path.write_bytes(content)

    c = cache(tmp_path, ctl_key)

    assert c.state() == "none"
    assert c.in_force() is None
    assert c.load_error is not None and c.load_error.reason == reason
    assert path.read_bytes() == content  # kept for inspection
    outcome = c.offer(bundle(ctl_key, 1))
    assert outcome.status == "applied"
    assert c.load_error is None


def test_unreadable_cache_file_means_no_policy(tmp_path: Path, ctl_key) -> None:
    (tmp_path / CACHE_NAME).mkdir()  # a directory where the file should be: reading fails
    c = cache(tmp_path, ctl_key)
    assert c.state() == "none"
    assert c.load_error is not None and c.load_error.reason == errors.MALFORMED


def test_write_is_atomic_and_leaves_no_temp_files(tmp_path: Path) -> None:
    target = tmp_path / CACHE_NAME
    target.write_bytes(b"old")
    write_atomically(target, b"new")
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == [CACHE_NAME]


def test_failed_write_keeps_the_old_file(tmp_path: Path, ctl_key) -> None:
    c = cache(tmp_path, ctl_key)
    c.offer(bundle(ctl_key, 1))
    before = (tmp_path / CACHE_NAME).read_bytes()
    # A file-size limit makes the write fail with EFBIG even for root, like a full disk would.
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64, hard))
    try:
        with pytest.raises(OSError):
            c.offer(bundle(ctl_key, 2))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert (tmp_path / CACHE_NAME).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [CACHE_NAME]
    assert c.version == 1
    assert cache(tmp_path, ctl_key).version == 1


def test_readers_see_either_the_old_or_the_new_bundle_whole(tmp_path: Path, ctl_key) -> None:
    c = cache(tmp_path, ctl_key)
    c.offer(bundle(ctl_key, 1))
    stop = threading.Event()
    torn: list[object] = []

    def read() -> None:
        while not stop.is_set():
            current = c.current()
            if current is None or current.bundle.policy != {"doors": [f"d{current.bundle.version}"]}:
                torn.append(current)
            on_disk = messages.open_bundle((tmp_path / CACHE_NAME).read_bytes(), ctl_key.public_key(), AGENT)
            if on_disk.bundle.policy != {"doors": [f"d{on_disk.bundle.version}"]}:
                torn.append(on_disk)

    readers = [threading.Thread(target=read) for _ in range(2)]
    for t in readers:
        t.start()
    try:
        for version in range(2, 40):
            assert c.offer(bundle(ctl_key, version)).status == "applied"
    finally:
        stop.set()
        for t in readers:
            t.join(10)
    assert torn == []
    assert c.version == 39
