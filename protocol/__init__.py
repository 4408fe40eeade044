"""The wire contract shared by agents and the controller: topics, envelopes, signatures. No I/O."""

PROTOCOL_VERSION = 1
