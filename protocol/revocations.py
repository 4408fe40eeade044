"""The revocation list the broker enforces: which agents and which certificates it refuses.

Two forms of the same content:

- the **broker file** that deploy/mosquitto/sekisho_agent_acl.c reads (plain lines, bounded, with an entry count
  at the end so that a truncated file is refused, never taken for a shorter list)::

      sekisho-revocations 1
      name term-07
      serial 5A0FC3 term-03
      end 2

- the **signed document** the controller serves at ``/api/v1/fleet/revocations`` for a broker on another host
  (``sekisho fleet revocations sync`` checks the controller's signature, then writes the broker file).

A ``name`` entry refuses every certificate of a revoked agent; a ``serial`` entry refuses one certificate (an
agent replaced or re-enrolled keeps its name, and only its old certificate is refused). Serials are written as
OpenSSL's BN_bn2hex writes them (upper-case hexadecimal in whole bytes), which is what the plugin compares.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from sekisho.protocol import errors, signing, timefmt, topics
from sekisho.protocol.canonical import canonical_bytes, loads_strict

MAGIC = "sekisho-revocations 1"
SIGNATURE_KIND = "revocations"
# Bounds the plugin enforces too (MAX_LIST_BYTES, MAX_ENTRIES): a list beyond them is refused as a whole.
MAX_LIST_BYTES = 8 * 1024 * 1024
MAX_ENTRIES = 100_000
_SERIAL = re.compile(r"0|(?!00)(?:[0-9A-F]{2}){1,32}")


def serial_text(serial: int) -> str:
    """Return a certificate serial number as the list (and OpenSSL's BN_bn2hex) writes it."""
    if serial < 0:
        raise ValueError("negative certificate serial")
    text = format(serial, "X")
    return "0" + text if len(text) % 2 else text


@dataclass(frozen=True, slots=True)
class RevocationList:
    """Agents refused whatever certificate they show, and single certificates refused (serial → agent)."""

    names: frozenset[str] = frozenset()
    serials: dict[str, str] = field(default_factory=dict)
    issued_at: datetime | None = None

    def __post_init__(self) -> None:
        """Refuse entries the broker plugin would refuse (so a bad list is caught where it is written)."""
        for name in (*self.names, *self.serials.values()):
            try:
                topics.check_agent_id(name)
            except errors.Rejected as err:
                raise ValueError(f"bad agent name in a revocation list: {err.detail}") from err
        for serial in self.serials:
            if not _SERIAL.fullmatch(serial):
                raise ValueError(f"bad certificate serial {serial!r}")
        if len(self.names) + len(self.serials) > MAX_ENTRIES:
            raise ValueError(f"more than {MAX_ENTRIES} revocations")

    def broker_text(self) -> str:
        """Return the broker file's text (sorted, so the same list always gives the same bytes)."""
        lines = [MAGIC]
        if self.issued_at is not None:
            lines.append(f"# issued {timefmt.fmt(self.issued_at)}")
        lines += [f"name {name}" for name in sorted(self.names)]
        lines += [f"serial {serial} {self.serials[serial]}" for serial in sorted(self.serials)]
        lines.append(f"end {len(self.names) + len(self.serials)}")
        text = "\n".join(lines) + "\n"
        if len(text.encode()) > MAX_LIST_BYTES:
            raise ValueError("revocation list larger than the broker accepts")
        return text

    def body(self) -> dict[str, Any]:
        """Return what the controller signs."""
        return {
            "v": 1,
            "issued_at": timefmt.fmt(self.issued_at or timefmt.now()),
            "names": sorted(self.names),
            "serials": {serial: self.serials[serial] for serial in sorted(self.serials)},
        }

    def same_entries(self, other: RevocationList) -> bool:
        """Tell whether both lists refuse the same agents and certificates (issued_at aside)."""
        return self.names == other.names and self.serials == other.serials


def parse_broker_text(text: str) -> RevocationList:
    """Parse a broker file as the plugin does (raise ValueError with the reason if it would refuse it)."""
    if len(text.encode()) > MAX_LIST_BYTES:
        raise ValueError("larger than the bound")
    if "\x00" in text:
        raise ValueError("NUL byte in the list")
    names: set[str] = set()
    serials: dict[str, str] = {}
    lines = [line for line in text.split("\n") if line and not line.startswith("#")]
    if not lines or lines[0] != MAGIC:
        raise ValueError(f'first line is not "{MAGIC}"')
    if not lines[-1].startswith("end "):
        raise ValueError("no end line (truncated?)")
    for line in lines[1:-1]:
        parts = line.split(" ")
        if parts[0] == "name" and len(parts) == 2:
            names.add(parts[1])
        elif parts[0] == "serial" and len(parts) == 3:
            serials[parts[1]] = parts[2]
        else:
            raise ValueError(f"bad line {line[:80]!r}")
    if lines[-1] != f"end {len(lines) - 2}":
        raise ValueError("entry count in the end line does not match")
    return RevocationList(frozenset(names), serials)


def sign_list(key: Ed25519PrivateKey, revocations: RevocationList) -> dict[str, Any]:
    """Return the signed document served to brokers on other hosts."""
    body = revocations.body()
    return {"revocations": body, "sig": signing.sign(key, SIGNATURE_KIND, body)}


def open_signed(document: bytes, key: Ed25519PublicKey) -> RevocationList:
    """Check a signed document with the controller's key and return its list (errors.Rejected if not good)."""
    try:
        doc = loads_strict(document, max_size=MAX_LIST_BYTES * 2)
        body, sig = doc["revocations"], doc["sig"]
        if not isinstance(body, dict) or body.get("v") != 1 or not isinstance(sig, str):
            raise errors.Rejected(errors.SCHEMA, "not a revocation list (v1)")
        signing.verify_canonical(key, SIGNATURE_KIND, canonical_bytes(body), sig)
        names, serials = body["names"], body["serials"]
        if not isinstance(names, list) or not isinstance(serials, dict):
            raise errors.Rejected(errors.SCHEMA, "names must be a list and serials an object")
        return RevocationList(
            frozenset(str(n) for n in names),
            {str(s): str(a) for s, a in serials.items()},
            issued_at=timefmt.parse(body["issued_at"]),
        )
    except errors.Rejected:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise errors.Rejected(errors.SCHEMA, f"revocation list unreadable: {type(err).__name__}") from err
