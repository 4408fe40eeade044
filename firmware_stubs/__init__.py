"""Stand-ins for device firmware that speak the real wire protocols (demo and tests only; not shipped)."""

if __name__ != "sekisho.firmware_stubs":  # pragma: no cover - reached only by a wrong import
    # Only `sekisho` is ours at the top of site-packages; a bare `import firmware_stubs` (say, from a checkout's root)
    # would load a second copy of these modules under another name.
    raise ImportError("import this package as sekisho.firmware_stubs, not firmware_stubs")
