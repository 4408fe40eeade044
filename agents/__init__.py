"""Endpoint agents: the shared runtime and the login, USB and door capabilities."""

if __name__ != "sekisho.agents":  # pragma: no cover - reached only by a wrong import
    # Only `sekisho` is ours at the top of site-packages; a bare `import agents` (say, from a checkout's root)
    # would load a second copy of these modules under another name.
    raise ImportError("import this package as sekisho.agents, not agents")
