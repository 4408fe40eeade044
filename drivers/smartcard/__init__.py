"""Smart-card driver: PC/SC (pyscard) and simulated backends, card diffs, APDUs, PIV challenge–response.

Only ``drivers.smartcard.pcsc`` imports pyscard, and only when the real backend is asked for, so agents and
the demo run on the simulated backend without pyscard installed.
"""

from sekisho.drivers.smartcard.auth import (
    AuthResult,
    EnrolledCard,
    EnrolmentError,
    EnrolmentRecord,
    UidIdentity,
    authenticate,
    enrol_card,
    hash_uid,
    identify_by_uid,
    public_key_fingerprint,
)
from sekisho.drivers.smartcard.errors import (
    CardError,
    CardRemoved,
    CardTimeout,
    MalformedResponse,
    ReaderUnavailable,
    StatusWordError,
)
from sekisho.drivers.smartcard.protocol import (
    CardConnection,
    CardEvent,
    CardObserver,
    CardPresence,
    Deadline,
    ReaderEvent,
    ReaderObserver,
    SmartCardBackend,
    mask_uid,
)
from sekisho.drivers.smartcard.simulated import SimulatedBackend, SimulatedCard


def pcsc_backend() -> SmartCardBackend:
    """Return the real PC/SC backend (imports pyscard; raises ImportError without it)."""
    from sekisho.drivers.smartcard.pcsc import PcscBackend

    return PcscBackend()


__all__ = [
    "AuthResult",
    "CardConnection",
    "CardError",
    "CardEvent",
    "CardObserver",
    "CardPresence",
    "CardRemoved",
    "CardTimeout",
    "Deadline",
    "EnrolledCard",
    "EnrolmentError",
    "EnrolmentRecord",
    "MalformedResponse",
    "ReaderEvent",
    "ReaderObserver",
    "ReaderUnavailable",
    "SimulatedBackend",
    "SimulatedCard",
    "SmartCardBackend",
    "StatusWordError",
    "UidIdentity",
    "authenticate",
    "enrol_card",
    "hash_uid",
    "identify_by_uid",
    "mask_uid",
    "pcsc_backend",
    "public_key_fingerprint",
]
