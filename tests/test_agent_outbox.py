"""The durable outbox: signed events on disk before append returns, seqs never reused, damage refused."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sekisho.agents.runtime.errors import OutboxError
from sekisho.agents.runtime.outbox import Outbox
from sekisho.protocol import errors, events, mynumber, signing

AGENT = "term-001"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def key():
    return signing.generate_key()


def open_outbox(path: Path, key, **kw) -> Outbox:
    return Outbox(path, signing_key=key, agent_id=AGENT, **kw)


def test_append_pending_remove(tmp_path: Path, key) -> None:
    box = open_outbox(tmp_path / "outbox.sqlite3", key)
    seqs = [box.append("test.synthetic", {"n": i}) for i in range(5)]
    assert seqs == [1, 2, 3, 4, 5]
    assert box.depth() == 5
    rows = box.pending(0, 10)
    assert [s for s, _ in rows] == seqs
    decoded = events.decode_event(rows[2][1], topic_agent=AGENT)
    decoded.verify(key.public_key())
    assert (decoded.seq, decoded.payload["n"], decoded.clock_synced, decoded.clock_offset_ms) == (3, 2, False, None)
    assert [s for s, _ in box.pending(3, 10)] == [4, 5]
    assert [s for s, _ in box.pending(0, 2)] == [1, 2]

    assert box.remove_ranges([(1, 2), (4, 4)]) == 3
    assert [s for s, _ in box.pending(0, 10)] == [3, 5]
    assert box.remove_ranges([(1, 2)]) == 0  # an ack seen twice changes nothing
    assert box.oldest_created_at() is not None
    box.close()


def test_append_many_is_one_batch_with_consecutive_seqs(tmp_path: Path, key) -> None:
    box = open_outbox(tmp_path / "o.sqlite3", key)
    box.append("test.synthetic", {"n": 0})
    assert box.append_many([("test.synthetic", {"n": i}) for i in range(1, 4)]) == [2, 3, 4]
    assert box.next_seq == 5
    box.close()


def test_clock_state_comes_from_the_callable(tmp_path: Path, key) -> None:
    box = open_outbox(tmp_path / "o.sqlite3", key, clock=lambda: (True, -42))
    box.append("test.synthetic", {"n": 1})
    decoded = events.decode_event(box.pending(0, 1)[0][1])
    assert (decoded.clock_synced, decoded.clock_offset_ms) == (True, -42)
    box.close()


def test_seq_persists_across_reopen_and_is_never_reused(tmp_path: Path, key) -> None:
    path = tmp_path / "o.sqlite3"
    box = open_outbox(path, key)
    for i in range(3):
        box.append("test.synthetic", {"n": i})
    box.remove_ranges([(1, 3)])
    assert box.depth() == 0
    box.close()

    again = open_outbox(path, key)
    assert again.next_seq == 4
    assert again.append("test.synthetic", {"n": 9}) == 4
    again.close()


def test_my_number_is_refused_and_nothing_is_stored(tmp_path: Path, key) -> None:
    box = open_outbox(tmp_path / "o.sqlite3", key)
    prefix = "12345678901"
    my_number = prefix + str(mynumber.check_digit(prefix))
    with pytest.raises(errors.Rejected) as info:
        box.append("test.synthetic", {"n": 1, "note": f"番号 {my_number}"})
    assert info.value.reason == errors.MY_NUMBER
    with pytest.raises(errors.Rejected):
        box.append_many([("test.synthetic", {"n": 1}), ("test.synthetic", {"n": 2, "note": my_number})])
    with pytest.raises(errors.Rejected) as info:
        box.append("test.synthetic", {"n": -1})
    assert info.value.reason == errors.SCHEMA
    assert box.depth() == 0
    assert box.next_seq == 1  # a refused event consumes no sequence number: no gap for the controller
    box.close()


def test_not_a_database_is_a_clear_error_and_left_untouched(tmp_path: Path, key) -> None:
    path = tmp_path / "o.sqlite3"
    garbage = b"this is not sqlite" * 300
    path.write_bytes(garbage)
    with pytest.raises(OutboxError, match="unreadable or damaged"):
        open_outbox(path, key)
    assert path.read_bytes() == garbage


def test_damaged_pages_are_detected(tmp_path: Path, key) -> None:
    path = tmp_path / "o.sqlite3"
    box = open_outbox(path, key)
    box.append_many([("test.synthetic", {"n": i, "note": "x" * 500}) for i in range(200)])
    box.close()
    # Scribble over the middle of the database file, as a failing disk might.
    data = bytearray(path.read_bytes())
    assert len(data) > 20_000
    data[8192:12288] = b"\xa5" * 4096
    path.write_bytes(bytes(data))
    with pytest.raises(OutboxError, match="damaged"):
        open_outbox(path, key)


def test_foreign_database_is_refused(tmp_path: Path, key) -> None:
    path = tmp_path / "o.sqlite3"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE something (x)")
    with pytest.raises(OutboxError, match="unexpected tables"):
        open_outbox(path, key)


def test_outbox_of_another_agent_is_refused(tmp_path: Path, key) -> None:
    path = tmp_path / "o.sqlite3"
    open_outbox(path, key).close()
    with pytest.raises(OutboxError, match="belongs to agent"):
        Outbox(path, signing_key=key, agent_id="term-002")


def test_inspect_reads_without_the_key(tmp_path: Path, key) -> None:
    path = tmp_path / "o.sqlite3"
    box = open_outbox(path, key)
    box.append_many([("test.synthetic", {"n": i}) for i in range(3)])
    stats = Outbox.inspect(path)
    assert (stats.agent, stats.depth, stats.next_seq) == (AGENT, 3, 4)
    box.close()


CHILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from sekisho.agents.runtime.outbox import Outbox
    from sekisho.protocol import signing
    key = signing.load_private_key(Path(sys.argv[2]))
    box = Outbox(Path(sys.argv[1]), signing_key=key, agent_id="term-001")
    while True:
        seq = box.append("test.synthetic", {"n": 1})
        # Reported only after append returned: the promise is that this event is already on disk.
        print(seq, flush=True)
    """
)


def test_appended_events_survive_sigkill_of_the_writer(tmp_path: Path, key) -> None:
    path = tmp_path / "o.sqlite3"
    key_path = tmp_path / "signing.key"
    key_path.write_bytes(signing.private_key_pem(key))
    with subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path), str(key_path)],
        stdout=subprocess.PIPE,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    ) as proc:  # leaving the block closes the pipe
        assert proc.stdout is not None
        try:
            reported = [int(proc.stdout.readline()) for _ in range(200)]
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
    assert reported == list(range(1, 201))

    box = open_outbox(path, key)
    stored = {seq for seq, _ in box.pending(0, 1_000_000)}
    assert set(reported) <= stored, "an event reported as written was lost"
    assert stored == set(range(1, max(stored) + 1)), "no gaps"
    assert box.next_seq == max(stored) + 1
    for _seq, wire in box.pending(0, 1_000_000):
        events.decode_event(wire, topic_agent=AGENT).verify(key.public_key())
    box.close()


def test_two_writers_never_share_a_sequence_number_regression_pam_helper(tmp_path: Path) -> None:
    # Regression: the next seq was kept in memory, so the PAM login helper (a second process writing the
    # same outbox) and the running agent handed out the same number.
    key = signing.generate_key()
    path = tmp_path / "outbox.sqlite3"
    agent = Outbox(path, signing_key=key, agent_id="term-001")
    helper = Outbox(path, signing_key=key, agent_id="term-001")
    seqs = []
    for i in range(10):
        seqs.append(agent.append("test.synthetic", {"n": i}))
        seqs.append(helper.append("test.synthetic", {"n": 100 + i}))
        seqs.extend(agent.append_many([("test.synthetic", {"n": 200 + i})]))
    assert sorted(seqs) == list(range(1, 31))
    assert [seq for seq, _ in agent.pending(0, 100)] == list(range(1, 31))
    agent.close()
    helper.close()
