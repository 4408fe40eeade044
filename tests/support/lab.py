"""Labs on the session's PKI, so that no test pays for generating CAs and keys of its own."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from sekisho.lab import Lab


def lab_on(pki: Path, root: Path, **options: Any) -> Lab:
    """Return a Lab rooted at ``root`` whose pki/ is a copy of the session PKI (the agents issued in it left out).

    Generating both CAs and the broker's and the controller's material is most of a fresh Lab's set-up; the
    copy is a few file writes. Each lab still has a PKI of its own: the agents it issues, and any certificate
    it re-issues or withdraws, stay in its copy.
    """
    source = pki.resolve()

    def issued_agents(directory: str, names: list[str]) -> list[str]:
        return ["agents"] if Path(directory) == source else []

    shutil.copytree(source, root / "pki", ignore=issued_agents)
    return Lab(root, **options)
