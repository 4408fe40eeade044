"""The central service: ingest, store, registers, policy authoring and the HTTP API."""

if __name__ != "sekisho.controller":  # pragma: no cover - reached only by a wrong import
    # Only `sekisho` is ours at the top of site-packages; a bare `import controller` (say, from a checkout's root)
    # would load a second copy of these modules under another name.
    raise ImportError("import this package as sekisho.controller, not controller")
