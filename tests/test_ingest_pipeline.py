"""The ingest pipeline (issue 14): the next batch is checked while the previous one is stored, and a batch's
PUBACKs, sent only after its commit, really release its messages at the broker. Real broker, real store, real
controller.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from support.lab import running_site
from support.mqtt import connect_client
from support.site import wait_for

from sekisho.controller.config import load_config
from sekisho.controller.service import Controller
from sekisho.deploy.pki import AgentCredentials
from sekisho.protocol import events, messages, signing, topics

pytestmark = pytest.mark.broker
AGENT = "term-p1"


def _event(lab: Any, seq: int) -> bytes:
    key = signing.load_private_key(AgentCredentials.at(lab.pki_dir, AGENT).signing_key)
    return events.build_event(key, agent=AGENT, seq=seq, type="test.synthetic", payload={"n": seq})


def _acked(client: Any, lab: Any, want: set[int]) -> set[int]:
    """Collect the controller's acks until every seq in want is acknowledged (or fail after the timeout)."""
    controller_key = signing.load_public_key(AgentCredentials.at(lab.pki_dir, AGENT).controller_signing_pub)
    seqs: set[int] = set()
    while not want <= seqs:
        ack = messages.open_ack(client.next_message(timeout=15).payload, controller_key, AGENT)
        for first, last in ack.ranges:
            seqs.update(range(first, last + 1))
    return seqs


def test_the_next_batch_is_checked_while_the_previous_one_is_stored(pki: Path, tmp_path: Path) -> None:
    with running_site(pki, tmp_path / "site", agents=(AGENT,)) as (lab, ctl):
        store = ctl.worker.store
        entered, release = threading.Event(), threading.Event()
        real_store_batch = store.store_batch

        def held_store_batch(*args: Any, **kwargs: Any) -> Any:
            # The first batch's transaction is held open until the test has seen the next batch checked.
            entered.set()
            assert release.wait(30)
            return real_store_batch(*args, **kwargs)

        store.store_batch = held_store_batch  # type: ignore[method-assign]
        client = connect_client(lab.pki_dir, lab.broker.port, AGENT)
        try:
            client.subscribe_wait(topics.topic(AGENT, topics.ACKS))
            events_topic = topics.topic(AGENT, topics.EVENTS)
            client.publish_wait(events_topic, _event(lab, 1))
            assert entered.wait(15), "the first batch never reached the store"
            client.publish_wait(events_topic, _event(lab, 2))
            # Checked (decoded, signature verified) while the first batch is still being stored.
            wait_for(lambda: ctl.worker.stats.received == 2, 15, "the second event to be checked meanwhile")
            assert ctl.worker.stats.stored == 0 and client.received() == []  # nothing acked before the commit
            release.set()
            assert _acked(client, lab, {1, 2}) == {1, 2}
        finally:
            release.set()
            client.close()
        assert ctl.store.event_seqs(AGENT) == [1, 2]
        assert [e.seq for e in ctl.store.list_events(agent_id=AGENT)] == [1, 2]  # stored in arrival order
        assert ctl.store.verify_chains(signatures=True) == []


def test_a_released_batch_is_not_redelivered_after_a_restart(pki: Path, tmp_path: Path) -> None:
    count = 40
    with running_site(pki, tmp_path / "site", agents=(AGENT,), batch_wait_ms=200) as (lab, ctl):
        client = connect_client(lab.pki_dir, lab.broker.port, AGENT)
        try:
            client.subscribe_wait(topics.topic(AGENT, topics.ACKS))
            events_topic = topics.topic(AGENT, topics.EVENTS)
            for seq in range(1, count + 1):
                client.publish(events_topic, _event(lab, seq), qos=1)
            assert _acked(client, lab, set(range(1, count + 1))) == set(range(1, count + 1))
            assert ctl.worker.stats.batches < count  # batches of several messages, released together
            ctl.stop()  # same worker id and persistent session: what the broker still holds comes back

            again = Controller(load_config(lab.controller_config))
            again.start()
            try:
                client.publish_wait(events_topic, _event(lab, count + 1))
                wait_for(lambda: again.store.event_seqs(AGENT)[-1:] == [count + 1], 15, "the new event stored")
                # A message whose PUBACK the broker did not take would have been delivered again, before the new one.
                assert again.worker.stats.received == 1
                assert again.worker.stats.duplicates == 0
            finally:
                again.stop()
        finally:
            client.close()
