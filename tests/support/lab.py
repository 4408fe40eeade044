"""Labs on the session's PKI (no test pays for generating CAs and keys of its own), and running sites."""

from __future__ import annotations

import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sekisho.controller.config import load_config
from sekisho.controller.service import Controller
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


@contextmanager
def running_site(
    pki: Path,
    root: Path,
    *,
    agents: Sequence[str],
    registered: Sequence[str] | None = None,
    policy: Path | None = None,
    **controller: object,
) -> Iterator[tuple[Lab, Controller]]:
    """Run a site on a real broker with the real controller in this process, stopping both afterwards.

    ``agents`` get credentials and configs; ``registered`` (default: all of them) are registered with the
    controller; ``policy`` (a site.yaml) is applied through the CLI before the controller starts;
    ``controller`` overrides go into controller.toml.
    """
    lab = lab_on(pki, root)
    lab.start_broker()
    lab.write_controller_config(**{"batch_wait_ms": 5, **controller})
    for name in agents:
        lab.add_agent(name)
    lab.register_agents(*(agents if registered is None else registered))
    if policy is not None:
        lab.sekisho("policy", "apply", str(policy), "--config", str(lab.controller_config))
    ctl = Controller(load_config(lab.controller_config))
    ctl.start()
    try:
        yield lab, ctl
    finally:
        ctl.stop()
        lab.stop_all()
