"""A software PIV card that plugs into pcscd's vpcd reader over TCP: the real PC/SC stack without a card.

Tests, ``sekisho bench login`` and the demo insert and remove it like a person would a card.

vpcd framing: every frame is a 2-byte big-endian length then the payload. A 1-byte payload is a control
message (0 power off, 1 power on, 2 reset, 4 send ATR); anything longer is a command APDU that gets a
response APDU. Connecting inserts the card; closing the socket removes it.

The card speaks just enough PIV for the driver's tests (SELECT, GET DATA 5FC101, GENERAL AUTHENTICATE with
a P-256 key over a host challenge) and the reader pseudo-APDU GET DATA UID. Written independently of
drivers/smartcard so that a shared misreading of the protocol does not make the tests pass.

Fault modes (``fault=``) for the time-outs: ``"stall"`` stops answering at the first command whose INS is
``fault_ins`` (every command when None, GET DATA UID included) — for ``stall_s`` seconds, then it answers as
if nothing happened, or until it is pulled when ``stall_s`` is None; ``"empty"`` answers that command with an
empty frame, which leaves vpcd (and so pcscd's SCardTransmit) waiting until the card is pulled. Control
messages (power, ATR) are always answered, so pcscd still sees the card in the reader. ``stalled`` is set
when the fault has struck, ``stall_answered`` when a timed stall has been answered after all.
"""

from __future__ import annotations

import contextlib
import datetime
import random
import socket
import struct
import threading
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.x509.oid import NameOID

VPCD_HOST = "127.0.0.1"
VPCD_PORT = 35963
PIV_AID = bytes.fromhex("A000000308000010000100")
CARD_AUTH_OBJECT = bytes.fromhex("5FC101")

# "refuses_to_sign": a clone with the genuine (public) certificate that answers GENERAL AUTHENTICATE with 6982.
Mode = Literal["piv", "wrong_key", "refuses_to_sign", "malformed", "felica_uid_only"]
Fault = Literal["stall", "empty"]
INS_GENERAL_AUTHENTICATE = 0x87
INS_SELECT = 0xA4
# "mute" never answers (until the card is pulled). A 0-byte answer is the "empty" fault instead: vpcd then
# never returns to pcscd until the card is pulled.
MalformedKind = Literal["one_byte", "bad_tlv", "garbage", "endless_61", "bad_signature_tlv", "mute"]


def _atr(historical: bytes) -> bytes:
    """Build an ATR offering T=1 with the given historical bytes and a correct TCK."""
    body = bytes([0x80 | len(historical), 0x80, 0x01]) + historical
    tck = 0
    for byte in body:
        tck ^= byte
    return b"\x3b" + body + bytes([tck])


PIV_ATR = _atr(b"sekisho-piv")
FELICA_ATR = _atr(bytes.fromhex("804F0CA00000030611003B00000000"))


def make_certificate(key: ec.EllipticCurvePrivateKey, common_name: str = "vcard") -> bytes:
    """Return a self-signed DER certificate for the key, as a site's card-issuing CA would put on the card."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=365))
        .sign(key, hashes.SHA256())
    )
    return certificate.public_bytes(serialization.Encoding.DER)


def _tlv(tag: bytes, value: bytes) -> bytes:
    n = len(value)
    if n < 0x80:
        length = bytes([n])
    elif n < 0x100:
        length = bytes([0x81, n])
    else:
        length = bytes([0x82]) + struct.pack(">H", n)
    return tag + length + value


class VirtualCard:
    """A card for vpcd: ``insert()`` connects to the reader, ``remove()`` disconnects."""

    # Responses longer than this are chained with 61xx so the driver's GET RESPONSE path runs for real.
    CHUNK = 200

    def __init__(
        self,
        *,
        uid: bytes,
        key: ec.EllipticCurvePrivateKey | None = None,
        certificate: bytes | None = None,
        mode: Mode = "piv",
        malformed: MalformedKind = "bad_tlv",
        port: int = VPCD_PORT,
        seed: int = 0,
        fault: Fault | None = None,
        fault_ins: int | None = None,
        stall_s: float | None = None,
    ) -> None:
        self.uid = uid
        self.key = key if key is not None else ec.generate_private_key(ec.SECP256R1())
        self.certificate = certificate if certificate is not None else make_certificate(self.key)
        if mode in ("wrong_key", "refuses_to_sign"):
            # A clone: the genuine UID and the genuine (public) certificate, but not the genuine private key.
            self.key = ec.generate_private_key(ec.SECP256R1())
        self.mode = mode
        self.malformed = malformed
        self.port = port
        self.atr = FELICA_ATR if mode == "felica_uid_only" else PIV_ATR
        self.fault = fault
        self.fault_ins = fault_ins
        self.stall_s = stall_s
        self.stalled = threading.Event()
        self.stall_answered = threading.Event()
        self.commands: list[bytes] = []
        self._gone = threading.Event()
        self._random = random.Random(seed)
        self._selected = False
        self._pending = b""
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None

    # -- life cycle ------------------------------------------------------------------------------

    def insert(self, timeout: float = 5.0) -> None:
        """Connect to vpcd, which makes pcscd see the card inserted."""
        sock = socket.create_connection((VPCD_HOST, self.port), timeout=timeout)
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._gone.clear()
        self.stalled.clear()
        self.stall_answered.clear()
        self._sock = sock
        self._thread = threading.Thread(target=self._serve, args=(sock,), name="vcard", daemon=True)
        self._thread.start()

    def remove(self) -> None:
        """Close the connection to vpcd, which makes pcscd see the card removed."""
        self._gone.set()
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> VirtualCard:
        self.insert()
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def _serve(self, sock: socket.socket) -> None:
        try:
            while True:
                header = self._read_exact(sock, 2)
                if header is None:
                    return
                (length,) = struct.unpack(">H", header)
                payload = self._read_exact(sock, length)
                if payload is None:
                    return
                if length == 1:
                    answer = self._control(payload[0])
                    if answer is not None:
                        sock.sendall(struct.pack(">H", len(answer)) + answer)
                    continue
                late = False
                if self._fault_strikes(payload):
                    self.stalled.set()
                    if self.fault == "empty":
                        self.commands.append(payload)
                        sock.sendall(struct.pack(">H", 0))
                        continue
                    if self.stall_s is None or self._gone.wait(self.stall_s):
                        self.commands.append(payload)
                        continue  # never answered: the card stays silent until it is pulled
                    late = True
                response = self.respond(payload)
                if self.mode == "malformed" and self.malformed == "mute" and payload[:2] != b"\xff\xca":
                    continue
                sock.sendall(struct.pack(">H", len(response)) + response)
                if late:
                    self.stall_answered.set()
        except OSError:
            return

    def _fault_strikes(self, apdu: bytes) -> bool:
        """Tell whether this command meets the card's fault (only the first such command of an insertion)."""
        if self.fault is None or self.stalled.is_set():
            return False
        return self.fault_ins is None or apdu[1] == self.fault_ins

    @staticmethod
    def _read_exact(sock: socket.socket, n: int) -> bytes | None:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            if not chunk:
                return None
            data += chunk
            # vpcd writes a command's 2-byte length and its bytes separately, and Nagle holds the second write
            # until this side acknowledges the first, which Linux delays by up to 40 ms: about 40 ms per
            # command that a card in a reader does not cost. Acknowledge at once (the flag resets after use).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        return data

    def _control(self, code: int) -> bytes | None:
        if code in (0, 1, 2):  # power off / on / reset: the card forgets its selected application
            self._selected = False
            self._pending = b""
            return None
        if code == 4:
            return self.atr
        return None

    # -- APDU handling --------------------------------------------------------------------------

    def respond(self, apdu: bytes) -> bytes:
        """Answer one command APDU with a response APDU (data + SW1 SW2)."""
        self.commands.append(apdu)
        ins = apdu[1]
        if apdu[:2] == b"\xff\xca":
            return self._get_uid(apdu)
        if self.mode == "felica_uid_only":
            # A FeliCa card has no ISO 7816 applications: the reader refuses everything else.
            return b"\x6a\x82" if ins == 0xA4 else b"\x6d\x00"
        if self.mode == "malformed":
            broken = self._malformed(apdu)
            if broken is not None:
                return broken
        if ins == 0xC0:
            return self._get_response(apdu)
        if ins == 0xA4:
            return self._select(apdu)
        if ins == 0xCB:
            return self._get_data(apdu)
        if ins == 0x87:
            return self._general_authenticate(apdu)
        return b"\x6d\x00"

    def _get_uid(self, apdu: bytes) -> bytes:
        le = apdu[4] if len(apdu) >= 5 else 0
        if le not in (0, len(self.uid)):
            return bytes([0x6C, len(self.uid)])
        return self.uid + b"\x90\x00"

    def _chained(self, data: bytes) -> bytes:
        if len(data) <= self.CHUNK:
            return data + b"\x90\x00"
        self._pending = data[self.CHUNK :]
        return data[: self.CHUNK] + bytes([0x61, min(len(self._pending), 0xFF) & 0xFF])

    def _get_response(self, apdu: bytes) -> bytes:
        if not self._pending:
            return b"\x69\x85"
        return self._chained(self._take_pending())

    def _take_pending(self) -> bytes:
        data, self._pending = self._pending, b""
        return data

    def _command_data(self, apdu: bytes) -> bytes:
        if len(apdu) <= 5:
            return b""
        return apdu[5 : 5 + apdu[4]]

    def _select(self, apdu: bytes) -> bytes:
        if apdu[2] != 0x04:
            return b"\x6a\x86"
        if self._command_data(apdu) != PIV_AID:
            self._selected = False
            return b"\x6a\x82"
        self._selected = True
        # Application property template: AID and a role, enough to look like PIV.
        return _tlv(b"\x61", _tlv(b"\x4f", PIV_AID[5:9]) + _tlv(b"\x79", _tlv(b"\x4f", PIV_AID))) + b"\x90\x00"

    def _get_data(self, apdu: bytes) -> bytes:
        if not self._selected:
            return b"\x69\x85"
        if apdu[2:4] != b"\x3f\xff":
            return b"\x6a\x86"
        body = self._command_data(apdu)
        if body[:2] != b"\x5c\x03":
            return b"\x6a\x80"
        if body[2:5] != CARD_AUTH_OBJECT:
            return b"\x6a\x82"
        inner = _tlv(b"\x70", self.certificate) + _tlv(b"\x71", b"\x00") + _tlv(b"\xfe", b"")
        return self._chained(_tlv(b"\x53", inner))

    def _general_authenticate(self, apdu: bytes) -> bytes:
        if not self._selected:
            return b"\x69\x85"
        if apdu[2] != 0x11 or apdu[3] != 0x9E:
            return b"\x6a\x86"
        if self.mode == "refuses_to_sign":
            return b"\x69\x82"  # security status not satisfied: a clone has no key to sign with
        body = self._command_data(apdu)
        # Expect 7C { 82 00, 81 <challenge> } in either order.
        if len(body) < 2 or body[0] != 0x7C:
            return b"\x6a\x80"
        inner = body[2 : 2 + body[1]]
        challenge = None
        pos = 0
        while pos + 2 <= len(inner):
            tag, length = inner[pos], inner[pos + 1]
            if tag == 0x81:
                challenge = inner[pos + 2 : pos + 2 + length]
            pos += 2 + length
        if challenge is None or len(challenge) != 32:
            return b"\x6a\x80"
        # PIV ECC: the host sends the hash to sign; the card signs it without hashing again.
        signature = self.key.sign(challenge, ec.ECDSA(Prehashed(hashes.SHA256())))
        return _tlv(b"\x7c", _tlv(b"\x82", signature)) + b"\x90\x00"

    def _malformed(self, apdu: bytes) -> bytes | None:
        kind = self.malformed
        if kind == "one_byte":
            return b"\x90"
        if kind == "garbage":
            return bytes(self._random.randrange(256) for _ in range(self._random.randrange(0, 40)))
        if kind == "endless_61":
            return b"\x61\x10" if apdu[1] != 0xA4 else None
        if kind == "bad_tlv" and apdu[1] == 0xCB and self._selected:
            # The outer 53 claims far more bytes than follow.
            return b"\x53\x82\x0f\xff\x70\x03\x01\x02\x90\x00"
        if kind == "bad_signature_tlv" and apdu[1] == 0x87 and self._selected:
            return b"\x7c\x05\x82\x40\x01\x02\x90\x00"
        return None
