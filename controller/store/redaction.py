"""Make arbitrary received bytes safe to keep: no My-Number-looking value is ever written to the store."""

from __future__ import annotations

import base64
import json

from sekisho.protocol import mynumber

BASE64_PREFIX = "base64:"


def _scrub_text(text: str) -> str:
    return str(mynumber.redact(text))


def redact_payload(raw: bytes) -> str:
    """Render received bytes as storable text with every My-Number-like value replaced.

    JSON is parsed so that escaped or nested values are found too. Clean JSON and clean text are
    kept byte for byte (so a dead-lettered event's signature can still be checked); JSON that needs
    redaction is re-serialised from the redacted document; other UTF-8 text is scrubbed as text;
    anything else is stored as "base64:" + base64 of the scrubbed bytes.
    """
    try:
        text: str | None = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None:
        try:
            doc = json.loads(text)
            redacted = mynumber.redact(doc)
            # ASCII output escapes NUL and lone surrogates, which PostgreSQL text cannot hold.
            rendered = json.dumps(redacted)
        except (ValueError, RecursionError):
            pass
        else:
            if redacted == doc and not mynumber.contains_my_number(text):
                return text
            # The text pass catches forms the JSON walk leaves alone, e.g. 123456789018.0.
            return _scrub_text(rendered)
        if "\x00" not in text:
            return _scrub_text(text)
    # Scrub the readable parts before encoding, so base64 never hides a My Number either.
    scrubbed = _scrub_text(raw.decode("utf-8", "surrogateescape")).encode("utf-8", "surrogateescape")
    # Base64 text can, by chance, contain a valid-looking 12-digit run; the last pass removes that too.
    return _scrub_text(BASE64_PREFIX + base64.b64encode(scrubbed).decode("ascii"))


def clean_text(value: str | None, limit: int) -> str | None:
    """Make a short caller-supplied string (topic, id, detail) safe and storable on every backend."""
    if value is None:
        return None
    safe = value.encode("utf-8", "replace").decode("utf-8").replace("\x00", "\ufffd")
    return _scrub_text(safe)[:limit]
