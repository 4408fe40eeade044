"""Whole OSDP packets found in the bytes a line carries: what the link counts as a sign of life.

libosdp keeps its packet parser to itself, and a byte arriving proves nothing (a floating RS-485 line, a
reader in a boot loop and a bad cable all produce bytes). ``FrameScanner`` follows one direction of a line
and yields only packets that are whole and whose check (CRC-16, or the 8-bit checksum of CRC-less packets)
is right, from or to the addresses it was told to watch. Noise finds no packet: a random start-of-message
would also need a watched address, a plausible length and a matching CRC-16.

It reads only the packet header, the secure-channel block type and the command or reply code; the data of
a packet under Secure Channel is ciphertext and is never looked at. The link uses the codes to follow the
Secure Channel handshake (``docs/doors.md``, "Reader links"): who sent what tells a wrong key from a reader
that cannot speak Secure Channel at all.
"""

from __future__ import annotations

import binascii
from collections.abc import Iterable
from dataclasses import dataclass

SOM = 0x53
REPLY_BIT = 0x80
BROADCAST = 0x7F
CONTROL_SEQUENCE = 0x03
CONTROL_CRC = 0x04
CONTROL_SCB = 0x08
# SOM, address, two length bytes, control: the smallest header; plus a code and a 1-byte checksum.
_HEADER = 5
_MIN_PACKET = 7
# libosdp's packet buffer is 256 bytes; the specification allows more, nobody sends that much to a reader.
MAX_PACKET = 1440
# Bytes kept while waiting for the rest of a packet: two of the largest packets.
_KEEP = 2 * MAX_PACKET

# Command and reply codes the link follows (OSDP 2.2, tables 5 and 6).
CMD_POLL, CMD_ID, CMD_CAP = 0x60, 0x61, 0x62
CMD_CHLNG, CMD_SCRYPT = 0x76, 0x77
REPLY_ACK, REPLY_NAK, REPLY_PDID, REPLY_PDCAP = 0x40, 0x41, 0x45, 0x46
REPLY_CCRYPT, REPLY_RMAC_I = 0x76, 0x78
# osdp_NAK error code: "unsupported security block or security conditions not met".
NAK_NO_SECURITY = 0x05
# osdp_PDCAP function code 9: communication security; compliance bit 0 is AES-128 Secure Channel.
CAP_COMMUNICATION_SECURITY = 9


def osdp_crc16(data: bytes) -> int:
    """Return OSDP's packet CRC (CRC-16/AUG-CCITT: polynomial 0x1021, not reflected, seed 0x1D0F)."""
    return binascii.crc_hqx(data, 0x1D0F)


@dataclass(frozen=True, slots=True)
class Frame:
    """One whole packet with a valid check: who, which direction, which code, which secure-channel block."""

    address: int
    reply: bool
    code: int
    sequence: int
    # The secure-channel block type (0x11..0x18), or None for a packet without one.
    scb_type: int | None
    # The data after the code, without MAC and check; ciphertext when scb_type is 0x17 or 0x18.
    data: bytes

    @property
    def plaintext(self) -> bool:
        """Return whether the data is readable (not an encrypted secure message)."""
        return self.scb_type not in (0x17, 0x18)


def sc_capable(pdcap_data: bytes) -> bool | None:
    """Read an osdp_PDCAP reply's data: True if it offers Secure Channel, False if not, None if malformed."""
    if len(pdcap_data) % 3:
        return None
    for offset in range(0, len(pdcap_data), 3):
        function, compliance = pdcap_data[offset], pdcap_data[offset + 1]
        if function == CAP_COMMUNICATION_SECURITY:
            return bool(compliance & 0x01)
    return False


class FrameScanner:
    """Finds whole, correctly checked OSDP packets in one direction of a line (commands or replies)."""

    def __init__(self, *, replies: bool, addresses: Iterable[int]) -> None:
        self._replies = replies
        self._addresses = frozenset(addresses)
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Frame]:
        """Take the next bytes seen on the line; return the packets they completed, in order."""
        if not data:
            return []
        self._buffer += data
        frames: list[Frame] = []
        start = 0
        waiting: int | None = None  # the first plausible packet still missing bytes
        buffer = self._buffer
        while True:
            position = buffer.find(SOM, start)
            if position < 0:
                break
            start = position + 1
            if len(buffer) - position < _HEADER:
                waiting = position if waiting is None else waiting
                break
            length = self._plausible(buffer, position)
            if length is None:
                continue
            if len(buffer) - position < length:
                # Maybe the rest is still on its way, maybe this was noise that happens to look like a
                # header: keep it, and look further for a whole packet starting inside it.
                waiting = position if waiting is None else waiting
                continue
            frame = self._decode(bytes(buffer[position : position + length]))
            if frame is None:
                continue
            frames.append(frame)
            # Everything before a good packet is spent, including a false header that spanned it.
            del buffer[: position + length]
            start, waiting = 0, None
        if waiting is not None:
            del buffer[:waiting]
        else:
            buffer.clear()
        if len(buffer) > _KEEP:
            del buffer[: len(buffer) - _KEEP]
        return frames

    def _plausible(self, buffer: bytearray, position: int) -> int | None:
        address_byte = buffer[position + 1]
        if bool(address_byte & REPLY_BIT) != self._replies:
            return None
        address = address_byte & 0x7F
        if address not in self._addresses and not (address == BROADCAST and not self._replies):
            return None
        length = buffer[position + 2] | buffer[position + 3] << 8
        if not _MIN_PACKET <= length <= MAX_PACKET:
            return None
        return length

    def _decode(self, packet: bytes) -> Frame | None:
        control = packet[4]
        if control & CONTROL_CRC:
            if len(packet) < _MIN_PACKET + 1:
                return None
            if osdp_crc16(packet[:-2]) != int.from_bytes(packet[-2:], "little"):
                return None
            end = len(packet) - 2
        else:
            if (-sum(packet[:-1])) & 0xFF != packet[-1]:
                return None
            end = len(packet) - 1
        body = _HEADER
        scb_type = None
        if control & CONTROL_SCB:
            scb_length = packet[_HEADER]
            if scb_length < 2 or _HEADER + scb_length >= end:
                return None
            scb_type = packet[_HEADER + 1]
            body += scb_length
            if scb_type >= 0x15:
                end -= 4  # the MAC of a secure message
        if body >= end:
            return None
        return Frame(
            address=packet[1] & 0x7F,
            reply=bool(packet[1] & REPLY_BIT),
            code=packet[body],
            sequence=control & CONTROL_SEQUENCE,
            scb_type=scb_type,
            data=packet[body + 1 : end],
        )
