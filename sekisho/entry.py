"""Console entry points. `sekisho agent …` and `sekisho-agent …` load only the agent's modules.

An agent lives on every terminal and door: importing FastAPI, SQLAlchemy, the benchmarks and the
demo it never uses would double its resident memory (docs/benchmarks.md).
"""

from __future__ import annotations

import sys
from functools import cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import typer


def agent_main(argv: list[str] | None = None) -> None:
    """Run the agent command line (`sekisho-agent run|simulate|status|enrol|renew|…`)."""
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["pam-auth"]:
        # pam_exec starts this for every login: the lean client, without typer, rich or the agent's modules.
        from sekisho.agents.login.pam_client import main as pam_auth

        raise SystemExit(pam_auth(args[1:]))
    agent_cli()(args=argv, prog_name="sekisho agent")


@cache
def agent_cli() -> typer.Typer:
    """Return the agent command line with every sub-command (built once: add_typer is not idempotent)."""
    from sekisho.agents.doors.cli import doors_app
    from sekisho.agents.login.cli import pam_app
    from sekisho.agents.runtime.cli import app
    from sekisho.agents.runtime.enrol_cli import enrol_app

    # The login guard's PAM entry point and terminal runner (`sekisho-agent pam-auth|terminal`) and the
    # door runner (`sekisho-agent doors`) sit beside run/status/simulate.
    app.add_typer(pam_app)
    app.add_typer(doors_app)
    app.add_typer(enrol_app)
    return app


def main() -> None:
    """Run the `sekisho` command line."""
    if sys.argv[1:2] == ["agent"]:
        agent_main(sys.argv[2:])
        return
    try:
        from sekisho.cli import app
    except ModuleNotFoundError as err:
        # An agent host is installed without the controller's stack (requirements/agent.txt): say what to
        # run there instead of a traceback.
        print(
            f"sekisho: this install has no controller ({err.name} is not installed). On an agent host use "
            "`sekisho-agent` (or `sekisho agent …`); the controller needs the controller install set.",
            file=sys.stderr,
        )
        raise SystemExit(2) from None
    app(prog_name="sekisho")
