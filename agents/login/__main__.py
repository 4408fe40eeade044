"""``python -m sekisho.agents.login pam-auth --config agent.toml --terminal T`` (what the PAM wrapper runs)."""

from __future__ import annotations

import logging
import sys

from sekisho.agents.login.cli import pam_app

if __name__ == "__main__":
    # Errors go to stderr (pam_exec's `log=` or the journal); only the user message goes to stdout.
    logging.basicConfig(level=logging.WARNING, format="sekisho-pam-auth %(levelname)s %(name)s: %(message)s")
    sys.exit(pam_app(prog_name="sekisho-pam-auth"))
