"""Smart-card driver errors: ISO 7816 status words and PC/SC codes translated into project exceptions that keep them."""

from __future__ import annotations

# Status words whose meaning does not depend on the low byte.
_SW_MEANINGS: dict[int, str] = {
    0x6281: "part of returned data may be corrupted",
    0x6282: "end of file reached before Le bytes",
    0x6581: "memory failure",
    0x6700: "wrong length",
    0x6881: "logical channel not supported",
    0x6882: "secure messaging not supported",
    0x6982: "security status not satisfied",
    0x6983: "authentication method blocked",
    0x6984: "reference data not usable",
    0x6985: "conditions of use not satisfied",
    0x6986: "command not allowed (no current EF)",
    0x6A80: "incorrect parameters in the data field",
    0x6A81: "function not supported",
    0x6A82: "file or application not found",
    0x6A83: "record not found",
    0x6A84: "not enough memory space in the file",
    0x6A86: "incorrect parameters P1-P2",
    0x6A88: "referenced data not found",
    0x6B00: "wrong parameters P1-P2",
    0x6D00: "instruction code not supported",
    0x6E00: "class not supported",
    0x6F00: "no precise diagnosis",
}


def describe_status_word(sw1: int, sw2: int) -> str:
    """Return a readable English meaning of an ISO 7816-4 status word."""
    sw = (sw1 << 8) | sw2
    if sw in _SW_MEANINGS:
        return _SW_MEANINGS[sw]
    if sw1 == 0x63 and sw2 & 0xF0 == 0xC0:
        return f"verification failed, {sw2 & 0x0F} retries left"
    if sw1 == 0x61:
        return f"{sw2} response bytes still available"
    if sw1 == 0x6C:
        return f"wrong Le, the card expects {sw2}"
    if sw1 in (0x62, 0x63):
        return "warning, non-volatile memory unchanged" if sw1 == 0x62 else "warning, non-volatile memory changed"
    if sw1 in (0x64, 0x65):
        return "execution error"
    if sw1 == 0x68:
        return "function in CLA not supported"
    if sw1 == 0x69:
        return "command not allowed"
    if sw1 == 0x6A:
        return "wrong parameters"
    return "unknown status word"


class CardError(Exception):
    """Base of the smart-card driver's errors; keeps the PC/SC return code when one caused it."""

    def __init__(self, message: str, *, pcsc_code: int | None = None) -> None:
        super().__init__(message)
        self.pcsc_code = pcsc_code

    def __str__(self) -> str:
        text = super().__str__()
        if self.pcsc_code is not None:
            # PC/SC codes are documented as unsigned 32-bit hex (0x80100069); pyscard may hand them signed.
            text += f" (PC/SC 0x{self.pcsc_code & 0xFFFFFFFF:08X})"
        return text


class StatusWordError(CardError):
    """The card answered a command with a status word other than 9000."""

    def __init__(self, sw1: int, sw2: int, apdu_name: str) -> None:
        self.sw1 = sw1
        self.sw2 = sw2
        self.sw = (sw1 << 8) | sw2
        self.apdu_name = apdu_name
        self.meaning = describe_status_word(sw1, sw2)
        super().__init__(f"{apdu_name}: card answered {self.sw:04X} ({self.meaning})")

    @property
    def retries_left(self) -> int | None:
        """Return the remaining verification tries for a 63Cx answer, else None."""
        if self.sw1 == 0x63 and self.sw2 & 0xF0 == 0xC0:
            return self.sw2 & 0x0F
        return None

    @property
    def blocked(self) -> bool:
        """Return whether the answer says the authentication method is blocked (6983)."""
        return self.sw == 0x6983


class CardRemoved(CardError):
    """The card left the reader (or was reset by someone else) before or during the exchange."""


class CardTimeout(CardError):
    """The card (or its reader) did not answer in the time allowed: one command, or the whole check.

    The PC/SC call it was waiting for may still be running (pcsc-lite cannot interrupt a transmit): the session
    that raised this is finished, and its handles are released once that call comes back.
    """


class ReaderUnavailable(CardError):
    """The reader or the PC/SC service is gone, unknown or not answering."""


class MalformedResponse(CardError):
    """The card's answer does not parse: shorter than a status word, wrong lengths or bad TLV."""
