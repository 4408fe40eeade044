"""APDU framing shared by every backend: response splitting, 61xx/6Cxx handling and BER-TLV parsing. No I/O."""

from __future__ import annotations

from collections.abc import Callable

from sekisho.drivers.smartcard.errors import MalformedResponse, StatusWordError

RawTransmit = Callable[[bytes], bytes]

# A card that keeps answering 61xx forever must not hang the login path; PIV certificates need < 20 rounds.
_MAX_CHAINED_RESPONSES = 64


def split_response(response: bytes) -> tuple[bytes, int, int]:
    """Split a response APDU into (data, sw1, sw2); raise MalformedResponse if it has no status word."""
    if len(response) < 2:
        raise MalformedResponse(f"response of {len(response)} byte(s) has no status word")
    return bytes(response[:-2]), response[-2], response[-1]


def _with_le(apdu: bytes, le: int) -> bytes:
    """Return a short APDU with its Le set (replaced or appended) to ``le``."""
    if len(apdu) == 4:  # case 1: no body
        return apdu + bytes([le])
    if len(apdu) == 5:  # case 2: the fifth byte is Le
        return apdu[:4] + bytes([le])
    lc = apdu[4]
    if lc and len(apdu) == 5 + lc:  # case 3: append Le
        return apdu + bytes([le])
    return apdu[:-1] + bytes([le])  # case 4: last byte is Le


def transmit_apdu(raw: RawTransmit, apdu: bytes, *, name: str = "APDU") -> bytes:
    """Send a command APDU and return its data, following 61xx GET RESPONSE and 6Cxx re-send; raise on non-9000."""
    if len(apdu) < 4:
        raise ValueError(f"{name}: a command APDU has at least 4 bytes, got {len(apdu)}")
    data, sw1, sw2 = split_response(raw(apdu))
    collected = bytearray(data)
    resent = False
    for _ in range(_MAX_CHAINED_RESPONSES):
        if (sw1, sw2) == (0x90, 0x00):
            return bytes(collected)
        if sw1 == 0x61:
            # Keep the logical channel bits of the original CLA; GET RESPONSE is always interindustry.
            get_response = bytes([apdu[0] & 0x03, 0xC0, 0x00, 0x00, sw2])
            data, sw1, sw2 = split_response(raw(get_response))
            collected += data
            continue
        if sw1 == 0x6C and not resent:
            # The card told us the exact Le; asking once more is the protocol, asking twice is a loop.
            resent = True
            collected.clear()
            data, sw1, sw2 = split_response(raw(_with_le(apdu, sw2)))
            collected += data
            continue
        raise StatusWordError(sw1, sw2, name)
    raise MalformedResponse(f"{name}: card kept chaining responses beyond {_MAX_CHAINED_RESPONSES} rounds")


def encode_length(length: int) -> bytes:
    """Encode a BER-TLV length."""
    if length < 0x80:
        return bytes([length])
    if length <= 0xFF:
        return bytes([0x81, length])
    if length <= 0xFFFF:
        return bytes([0x82]) + length.to_bytes(2, "big")
    raise ValueError(f"TLV length {length} too large")


def encode_tlv(tag: int, value: bytes) -> bytes:
    """Encode one BER-TLV element; multi-byte tags are given as their big-endian integer."""
    tag_bytes = tag.to_bytes(max(1, (tag.bit_length() + 7) // 8), "big")
    return tag_bytes + encode_length(len(value)) + value


def parse_tlv(data: bytes) -> list[tuple[int, bytes]]:
    """Parse a BER-TLV sequence into (tag, value) pairs; raise MalformedResponse on truncation or bad lengths."""
    items: list[tuple[int, bytes]] = []
    pos = 0
    end = len(data)
    while pos < end:
        first = data[pos]
        if first in (0x00, 0xFF):
            # Padding between elements is allowed by ISO 7816-4 and some cards use it.
            pos += 1
            continue
        tag = first
        pos += 1
        if first & 0x1F == 0x1F:
            while True:
                if pos >= end:
                    raise MalformedResponse("TLV tag truncated")
                byte = data[pos]
                tag = (tag << 8) | byte
                pos += 1
                if not byte & 0x80:
                    break
                if tag > 0xFFFFFF:
                    raise MalformedResponse("TLV tag longer than 3 bytes")
        if pos >= end:
            raise MalformedResponse(f"TLV length missing after tag {tag:X}")
        length = data[pos]
        pos += 1
        if length & 0x80:
            count = length & 0x7F
            if count == 0 or count > 3:
                raise MalformedResponse(f"TLV length form 0x{length:02X} not supported")
            if pos + count > end:
                raise MalformedResponse("TLV length truncated")
            length = int.from_bytes(data[pos : pos + count], "big")
            pos += count
        if pos + length > end:
            raise MalformedResponse(f"TLV {tag:X} claims {length} bytes, only {end - pos} remain")
        items.append((tag, bytes(data[pos : pos + length])))
        pos += length
    return items


def find_tlv(data: bytes, tag: int) -> bytes:
    """Return the value of the first top-level element with ``tag``; raise MalformedResponse if absent."""
    for found, value in parse_tlv(data):
        if found == tag:
            return value
    raise MalformedResponse(f"TLV {tag:X} missing from the response")
