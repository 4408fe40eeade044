"""The locker board's wire format (docs/locker-board-protocol.md): byte-stuffed frames with a CRC-16, and payloads.

A frame on the wire is ``STX`` then, byte-stuffed, ``LEN SEQ CMD PAYLOAD[LEN] CRC_HI CRC_LO``. The CRC is
CRC-16/CCITT-FALSE over ``LEN SEQ CMD PAYLOAD`` before stuffing. Stuffing replaces a 0x02 or 0x10 inside the
frame with ``0x10, byte ^ 0x20``, so a raw 0x02 only ever starts a frame: the decoder resynchronises on the
next STX whatever noise came before, and noise can never swallow a good frame that follows it.

Pure functions and a streaming decoder, no I/O: the link and the fuzz tests share them.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from sekisho.drivers.locker.errors import MalformedFrame

STX = 0x02
DLE = 0x10
ESCAPE_XOR = 0x20
MAX_PAYLOAD = 96
PROTOCOL_VERSION = 1
BAUD_RATE = 115200
MAX_ON_LIMIT_MS = 3_600_000  # the longest board timer a host may ask for; None asks for none
MAX_INDEX = 255
_HEADER = 3  # LEN, SEQ, CMD
_CRC = 2


class Command(IntEnum):
    """Host → board commands."""

    HELLO = 0x01
    STATUS = 0x02
    SET_RELAY = 0x03
    PING = 0x04


class Reply(IntEnum):
    """Board → host answers; SEQ echoes the command's."""

    ACK = 0x80
    NAK = 0x81
    INFO = 0x82
    STATUS = 0x83


class Report(IntEnum):
    """Board → host unsolicited reports; SEQ is the board's own report counter (BOOT resets it to 0)."""

    INPUT_CHANGED = 0x90
    RELAY_EXPIRED = 0x91
    BOOT = 0x9F


class InputCode(IntEnum):
    """The ``kind`` byte of INPUT_CHANGED."""

    DOOR = 1
    KEY_SLOT = 2
    TAMPER = 3
    RELAY_FEEDBACK = 4


NAK_REASONS: dict[int, str] = {
    1: "bad_index",
    2: "bad_length",
    3: "unknown_command",
    4: "bad_value",
    5: "unsupported_version",
}


def crc16_ccitt(data: bytes, crc: int = 0xFFFF) -> int:
    """Return CRC-16/CCITT-FALSE (polynomial 0x1021, initial 0xFFFF, not reflected); "123456789" gives 0x29B1."""
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
        crc &= 0xFFFF
    return crc


@dataclass(frozen=True, slots=True)
class Frame:
    """One decoded frame: sequence number, command or reply code, payload."""

    seq: int
    cmd: int
    payload: bytes = b""


@dataclass(frozen=True, slots=True)
class Noise:
    """Bytes the decoder had to throw away, and why."""

    reason: str
    dropped: int


def encode_frame(seq: int, cmd: int, payload: bytes = b"") -> bytes:
    """Return the wire bytes of one frame (STX, then the stuffed body and CRC)."""
    if not 0 <= seq <= 0xFF or not 0 <= cmd <= 0xFF:
        raise ValueError("seq and cmd are single bytes")
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"payload longer than {MAX_PAYLOAD} bytes")
    body = bytes([len(payload), seq, cmd]) + payload
    body += crc16_ccitt(body).to_bytes(2, "big")
    out = bytearray([STX])
    for byte in body:
        if byte in (STX, DLE):
            out += bytes([DLE, byte ^ ESCAPE_XOR])
        else:
            out.append(byte)
    return bytes(out)


class FrameDecoder:
    """Turn a byte stream, in chunks of any size, into frames and reports of the noise between them; never raises."""

    def __init__(self) -> None:
        self._in_frame = False
        self._escaped = False
        self._body = bytearray()
        self._raw = 0  # wire bytes of the frame being collected, for the noise count
        self._skipped = 0  # bytes seen outside any frame since the last report

    def feed(self, data: bytes) -> list[Frame | Noise]:
        """Take the next bytes from the line; return the frames completed and the noise found, in line order."""
        out: list[Frame | Noise] = []
        for byte in data:
            if byte == STX:
                # A raw STX always starts a frame: stuffing keeps it out of every frame body.
                if self._skipped:
                    out.append(Noise("noise outside a frame", self._skipped))
                    self._skipped = 0
                if self._in_frame:
                    out.append(Noise("truncated frame", self._raw))
                self._start()
                continue
            if not self._in_frame:
                self._skipped += 1
                continue
            self._raw += 1
            if self._escaped:
                self._escaped = False
                if byte not in (STX ^ ESCAPE_XOR, DLE ^ ESCAPE_XOR):
                    out.append(Noise("bad escape", self._raw))
                    self._in_frame = False
                    continue
                byte ^= ESCAPE_XOR
            elif byte == DLE:
                self._escaped = True
                continue
            self._body.append(byte)
            item = self._check()
            if item is not None:
                out.append(item)
                self._in_frame = False
        if self._skipped and not self._in_frame:
            # Report noise promptly rather than only when the next frame starts: the line may stay quiet.
            out.append(Noise("noise outside a frame", self._skipped))
            self._skipped = 0
        return out

    def _start(self) -> None:
        self._in_frame = True
        self._escaped = False
        self._body.clear()
        self._raw = 1

    def _check(self) -> Frame | Noise | None:
        body = self._body
        if len(body) == 1 and body[0] > MAX_PAYLOAD:
            return Noise("oversized frame", self._raw)
        if len(body) < _HEADER + _CRC or len(body) < _HEADER + body[0] + _CRC:
            return None
        if crc16_ccitt(bytes(body[:-_CRC])) != int.from_bytes(body[-_CRC:], "big"):
            return Noise("bad checksum", self._raw)
        return Frame(seq=body[1], cmd=body[2], payload=bytes(body[_HEADER:-_CRC]))


# ---- payloads ----


def pack_bits(bits: tuple[bool, ...] | list[bool]) -> bytes:
    """Pack flags into bytes, index i at byte i // 8, bit i % 8 (least significant first)."""
    out = bytearray((len(bits) + 7) // 8)
    for index, bit in enumerate(bits):
        if bit:
            out[index // 8] |= 1 << (index % 8)
    return bytes(out)


def unpack_bits(data: bytes, count: int) -> tuple[bool, ...]:
    """Unpack ``count`` flags packed by ``pack_bits``."""
    return tuple(bool(data[index // 8] >> (index % 8) & 1) for index in range(count))


def encode_hello() -> bytes:
    """Return HELLO's payload: the host's protocol version."""
    return bytes([PROTOCOL_VERSION])


def encode_set_relay(index: int, on: bool, max_on_ms: int | None) -> bytes:
    """Return SET_RELAY's payload: index, state, board timer in ms big-endian (0: none)."""
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index <= MAX_INDEX:
        raise ValueError(f"relay index must be an integer in 0..{MAX_INDEX}")
    timer = 0
    if on and max_on_ms is not None:
        if isinstance(max_on_ms, bool) or not isinstance(max_on_ms, int) or not 1 <= max_on_ms <= MAX_ON_LIMIT_MS:
            raise ValueError(f"max_on_ms must be None or an integer in 1..{MAX_ON_LIMIT_MS}")
        timer = max_on_ms
    return bytes([index, 1 if on else 0]) + timer.to_bytes(4, "big")


@dataclass(frozen=True, slots=True)
class BoardInfo:
    """INFO (answer to HELLO) and BOOT payload: protocol version, sizes, boot counter, firmware name."""

    version: int
    relays: int
    doors: int
    key_slots: int
    boot_count: int
    firmware: str = ""


def encode_info(info: BoardInfo) -> bytes:
    """Return an INFO/BOOT payload."""
    name = info.firmware.encode("ascii", "replace")[: MAX_PAYLOAD - 8]
    head = bytes([info.version, info.relays, info.doors, info.key_slots])
    return head + info.boot_count.to_bytes(4, "big") + name


def parse_info(payload: bytes) -> BoardInfo:
    """Parse an INFO/BOOT payload; raise MalformedFrame if it is too short."""
    if len(payload) < 8:
        raise MalformedFrame(f"INFO/BOOT payload of {len(payload)} bytes, at least 8 expected")
    return BoardInfo(
        version=payload[0],
        relays=payload[1],
        doors=payload[2],
        key_slots=payload[3],
        boot_count=int.from_bytes(payload[4:8], "big"),
        firmware=payload[8:].decode("ascii", "replace"),
    )


@dataclass(frozen=True, slots=True)
class WireStatus:
    """A STATUS payload: sizes, tamper, boot counter, last report sequence and the four bitmaps."""

    boot_count: int
    event_seq: int
    tamper: bool
    relays_commanded: tuple[bool, ...]
    relays_sensed: tuple[bool, ...]
    doors_open: tuple[bool, ...]
    keys_present: tuple[bool, ...]


def _bitmap_size(count: int) -> int:
    return (count + 7) // 8


def encode_status(status: WireStatus) -> bytes:
    """Return a STATUS payload."""
    relays, doors, keys = len(status.relays_commanded), len(status.doors_open), len(status.keys_present)
    if len(status.relays_sensed) != relays:
        raise ValueError("commanded and sensed relay maps differ in size")
    head = bytes([relays, doors, keys, 1 if status.tamper else 0])
    head += status.boot_count.to_bytes(4, "big") + bytes([status.event_seq])
    return (
        head
        + pack_bits(status.relays_commanded)
        + pack_bits(status.relays_sensed)
        + pack_bits(status.doors_open)
        + pack_bits(status.keys_present)
    )


def parse_status(payload: bytes) -> WireStatus:
    """Parse a STATUS payload; raise MalformedFrame if its length does not match its sizes."""
    if len(payload) < 9:
        raise MalformedFrame(f"STATUS payload of {len(payload)} bytes, at least 9 expected")
    relays, doors, keys, flags = payload[0], payload[1], payload[2], payload[3]
    sizes = (_bitmap_size(relays), _bitmap_size(relays), _bitmap_size(doors), _bitmap_size(keys))
    if len(payload) != 9 + sum(sizes):
        raise MalformedFrame(f"STATUS payload of {len(payload)} bytes does not fit {relays}/{doors}/{keys} inputs")
    if flags & ~0x01:
        raise MalformedFrame(f"STATUS flags 0x{flags:02X} has unknown bits")
    offset = 9
    maps: list[tuple[bool, ...]] = []
    for size, count in zip(sizes, (relays, relays, doors, keys), strict=True):
        maps.append(unpack_bits(payload[offset : offset + size], count))
        offset += size
    return WireStatus(
        boot_count=int.from_bytes(payload[4:8], "big"),
        event_seq=payload[8],
        tamper=bool(flags & 0x01),
        relays_commanded=maps[0],
        relays_sensed=maps[1],
        doors_open=maps[2],
        keys_present=maps[3],
    )


@dataclass(frozen=True, slots=True)
class WireInput:
    """An INPUT_CHANGED payload."""

    code: InputCode
    index: int
    active: bool


def encode_input(report: WireInput) -> bytes:
    """Return an INPUT_CHANGED payload."""
    return bytes([report.code, report.index, 1 if report.active else 0])


def parse_input(payload: bytes) -> WireInput:
    """Parse an INPUT_CHANGED payload; raise MalformedFrame on a wrong length, kind or state."""
    if len(payload) != 3:
        raise MalformedFrame(f"INPUT_CHANGED payload of {len(payload)} bytes, 3 expected")
    try:
        code = InputCode(payload[0])
    except ValueError:
        raise MalformedFrame(f"INPUT_CHANGED of unknown kind {payload[0]}") from None
    if payload[2] > 1:
        raise MalformedFrame(f"INPUT_CHANGED state {payload[2]} is neither 0 nor 1")
    return WireInput(code=code, index=payload[1], active=bool(payload[2]))


def parse_index(payload: bytes) -> int:
    """Parse a one-byte relay index payload (RELAY_EXPIRED)."""
    if len(payload) != 1:
        raise MalformedFrame(f"RELAY_EXPIRED payload of {len(payload)} bytes, 1 expected")
    return payload[0]


def parse_nak(payload: bytes) -> tuple[int, str]:
    """Return a NAK's wire code and reason name (``nak_N`` for codes this host does not know)."""
    if len(payload) != 1:
        raise MalformedFrame(f"NAK payload of {len(payload)} bytes, 1 expected")
    return payload[0], NAK_REASONS.get(payload[0], f"nak_{payload[0]}")
