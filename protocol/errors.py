"""Errors raised while decoding or verifying messages; each carries a stable reason code."""

from __future__ import annotations


class Rejected(Exception):
    """A message that must not be accepted, with a machine-readable reason code and a human detail."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


# Stable reason codes. Dead letters, events and docs refer to these strings.
MALFORMED = "malformed"
TOO_LARGE = "too_large"
UNSUPPORTED_VERSION = "unsupported_version"
UNKNOWN_TYPE = "unknown_type"
SCHEMA = "schema"
TOPIC_MISMATCH = "topic_mismatch"
UNKNOWN_AGENT = "unknown_agent"
BAD_SIGNATURE = "bad_signature"
MY_NUMBER = "my_number"
EXPIRED = "expired"
NOT_YET_VALID = "not_yet_valid"
REPLAY = "replay"
WRONG_AGENT = "wrong_agent"
ROLLBACK = "rollback"
# Raised by the store: an event id reused by another (agent, seq), or a seq reused with another event id.
DUPLICATE_ID = "duplicate_id"
# Raised by ingest: a message whose processing failed in a way no other reason describes (a bug, or input
# that defeats a check), or that the store could not take after repeated attempts. Kept, never retried forever.
UNPROCESSABLE = "unprocessable"
# Raised by ingest: a signed event naming a door, terminal or area that the policy gives to another agent.
NOT_OWNER = "not_owner"
SEQ_CONFLICT = "seq_conflict"
# Raised by ingest: an event signed by a revoked agent's key (kept as evidence, acknowledged: resending is futile).
REVOKED_AGENT = "revoked_agent"
# Raised by ingest: an event signed with an agent's replaced key, received after the rotation's grace window.
STALE_KEY = "stale_key"
