"""OSDP card readers: sekisho as control panel through libosdp (Secure Channel, LED, buzzer, keypad), and a simulator.

Only ``drivers.osdp.link`` and ``drivers.osdp.channel`` import libosdp and pyserial, and only when the real
link is asked for, so agents and the demo run on ``SimulatedReaderLink`` without them installed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sekisho.drivers.osdp.errors import KeySetError, LinkUnavailable, OsdpError, UnknownReader
from sekisho.drivers.osdp.protocol import (
    SCBK_DEFAULT,
    CardRead,
    KeypadInput,
    LedColour,
    ReaderConfig,
    ReaderEvent,
    ReaderFlood,
    ReaderLink,
    ReaderObserver,
    ReaderStatus,
    ScFailure,
)
from sekisho.drivers.osdp.simulated import BuzzerFeedback, Feedback, LedFeedback, SimulatedReaderLink, TextFeedback

if TYPE_CHECKING:
    from sekisho.drivers.osdp.link import OsdpReaderLink


def __getattr__(name: str) -> Any:
    """Import the libosdp-backed classes on first use (``drivers.osdp.OsdpReaderLink``)."""
    if name == "OsdpReaderLink":
        from sekisho.drivers.osdp.link import OsdpReaderLink

        return OsdpReaderLink
    if name in ("FdChannel", "SerialChannel"):
        from sekisho.drivers.osdp import channel

        return getattr(channel, name)
    raise AttributeError(f"module 'sekisho.drivers.osdp' has no attribute {name!r}")


__all__ = [
    "SCBK_DEFAULT",
    "BuzzerFeedback",
    "CardRead",
    "Feedback",
    "KeySetError",
    "KeypadInput",
    "LedColour",
    "LedFeedback",
    "LinkUnavailable",
    "OsdpError",
    "OsdpReaderLink",
    "ReaderConfig",
    "ReaderEvent",
    "ReaderFlood",
    "ReaderLink",
    "ReaderObserver",
    "ReaderStatus",
    "ScFailure",
    "SimulatedReaderLink",
    "TextFeedback",
    "UnknownReader",
]
