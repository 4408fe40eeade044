"""The policy's cards as the smart-card driver enrols them: shared by the login guard and PC/SC door readers."""

from __future__ import annotations

from collections.abc import Iterable

from sekisho.drivers.smartcard import EnrolledCard
from sekisho.protocol.policy import Card


def enrolled_cards(cards: Iterable[Card]) -> list[EnrolledCard]:
    """Map policy cards to the driver's enrolment: a card with a public key must prove it (challenge–response)."""
    # A card without an enrolled key can only be recognised by its UID: UID-only, weak.
    return [
        EnrolledCard(
            card_id=c.id,
            uid_hash=c.uid_hash,
            public_key_pem=c.public_key_pem,
            kind="piv" if c.public_key_pem else "uid_only",
        )
        for c in cards
    ]
