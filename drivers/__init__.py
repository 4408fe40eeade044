"""Hardware and OS device stacks: the only code that touches them (one folder per device kind)."""

if __name__ != "sekisho.drivers":  # pragma: no cover - reached only by a wrong import
    # Only `sekisho` is ours at the top of site-packages; a bare `import drivers` (say, from a checkout's root)
    # would load a second copy of these modules under another name.
    raise ImportError("import this package as sekisho.drivers, not drivers")
