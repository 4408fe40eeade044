"""Deployment: PKI, broker configuration and ACL, PAM snippets and installer, the demo site."""

if __name__ != "sekisho.deploy":  # pragma: no cover - reached only by a wrong import
    # Only `sekisho` is ours at the top of site-packages; a bare `import deploy` (say, from a checkout's root)
    # would load a second copy of these modules under another name.
    raise ImportError("import this package as sekisho.deploy, not deploy")
