"""A PC/SC reader serving a door: the real pcscd with vpcd and the software card, through PcscDoorReaders."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from agents.doors.attach import PcscDoorReaders, card_evidence
from firmware_stubs.piv_card import VirtualCard
from sekisho.pcscd import VPCD_READER

pytest_plugins = ["pcsc_fixtures"]

UID = bytes.fromhex("04D0012345AB01")
SITE_KEY = b"pcsc-door-site-key-0123456789abc"


@pytest.fixture
def taps(pcscd: object) -> Iterator[tuple[list[tuple[str, bytes]], threading.Event]]:
    """Door reader "rdr-pcsc" on the vpcd reader; every tap is collected."""
    from drivers.smartcard.pcsc import PcscBackend

    seen: list[tuple[str, bytes]] = []
    tapped = threading.Event()

    def on_tap(reader_id: str, uid: bytes) -> None:
        seen.append((reader_id, uid))
        tapped.set()

    with PcscBackend() as backend:
        assert backend.wait_until_monitoring(5)
        readers = PcscDoorReaders(backend, {VPCD_READER: "rdr-pcsc"})
        readers.start(on_tap)
        try:
            yield seen, tapped
        finally:
            readers.stop()


def test_card_on_a_pcsc_reader_is_a_tap(taps: tuple[list[tuple[str, bytes]], threading.Event]) -> None:
    seen, tapped = taps
    with VirtualCard(uid=UID):
        assert tapped.wait(5), "no tap for the card placed on the reader"
    assert seen == [("rdr-pcsc", UID)]
    evidence = card_evidence(UID, SITE_KEY)
    # Only the keyed hash and a masked form leave the adapter; a UID read is weak by nature.
    assert evidence.weak and evidence.card_masked == "****-AB01" and UID.hex() not in evidence.card_hash


def test_unmapped_reader_is_ignored(pcscd: object) -> None:
    from drivers.smartcard.pcsc import PcscBackend

    seen: list[tuple[str, bytes]] = []
    with PcscBackend() as backend:
        assert backend.wait_until_monitoring(5)
        readers = PcscDoorReaders(backend, {"Some Other Reader 00 00": "rdr-x"})
        readers.start(lambda reader_id, uid: seen.append((reader_id, uid)))
        try:
            with VirtualCard(uid=UID):
                threading.Event().wait(1.0)
        finally:
            readers.stop()
    assert seen == []
