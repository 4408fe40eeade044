"""Lab mode: the one switch that lets an agent use a simulated backend chosen by its configuration.

A simulated lock board never moves a relay and a simulated reader reads no card: in a real box it would look
configured and protect nothing. So a configuration that names one is refused unless the agent's process
runs with ``SEKISHO_LAB=1`` in its environment — the demo, the benchmarks and the tests set it (the Lab in
sekisho/lab does for everything it starts); a service unit on a real terminal or door box never does.
The configuration says *what* is simulated, the environment says *that this is a lab*: a demo doors.toml
copied onto a real box is refused, and a stray variable alone switches nothing on.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from sekisho.common.i18n import _

LAB_ENV = "SEKISHO_LAB"


def lab_mode(env: Mapping[str, str] | None = None) -> bool:
    """Tell whether this process runs in lab mode (``SEKISHO_LAB=1``)."""
    return (os.environ if env is None else env).get(LAB_ENV) == "1"


def simulation_refused(what: str) -> str:
    """Return the message (in this process's language) that refuses a simulated backend outside lab mode."""
    return _(
        "%(what)s: a simulated backend is refused outside lab mode: it would look configured and protect nothing "
        "(demo and tests only: set %(variable)s=1)",
        what=what,
        variable=LAB_ENV,
    )
