"""First key for a new OSDP reader: install mode → a fresh per-reader Secure Channel key, stored for doors.toml.

A reader fresh from the box speaks Secure Channel only under the public default key (SCBK-D), which the
link never trusts for cards. ``install_reader_key`` waits for the reader on the default key, generates a
random 16-byte key, writes it to the reader's ``scbk_file`` (mode 0600, never printed or logged) and sends
it with KEYSET; from then on the reader answers only to that key and doors.toml names it with
``install_mode = false``. The key file is written before the reader takes it, so a failure in between
leaves a key the site still holds.
"""

from __future__ import annotations

import secrets
import time
from pathlib import Path

from sekisho.common.files import write_atomically
from sekisho.drivers.osdp import OsdpReaderLink
from sekisho.drivers.osdp.errors import KeySetError


def install_reader_key(link: OsdpReaderLink, reader_id: str, key_file: Path, *, timeout: float = 15.0) -> None:
    """Key a reader in install mode with a new random key, saved to ``key_file`` first; KeySetError on failure."""
    if key_file.exists():
        # Never overwrite a key in use: losing it would orphan the reader until it is reset by hand.
        raise KeySetError(f"{key_file} exists: this reader already has a key (remove the file to re-key)")
    deadline = time.monotonic() + timeout
    while not link.online(reader_id):
        if time.monotonic() > deadline:
            raise KeySetError(f"reader {reader_id} did not come online in install mode within {timeout} s")
        time.sleep(0.05)
    key = secrets.token_bytes(16)
    key_file.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(key_file, key.hex().encode() + b"\n", mode=0o600)
    link.set_key(reader_id, key, timeout=max(1.0, deadline - time.monotonic()))
