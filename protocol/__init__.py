"""The wire contract shared by agents and the controller: topics, envelopes, signatures. No I/O."""

PROTOCOL_VERSION = 1

if __name__ != "sekisho.protocol":  # pragma: no cover - reached only by a wrong import
    # Only `sekisho` is ours at the top of site-packages; a bare `import protocol` (say, from a checkout's root)
    # would load a second copy of these modules under another name.
    raise ImportError("import this package as sekisho.protocol, not protocol")
