"""``python -m sekisho.agents.login pam-auth --config agent.toml --terminal T`` (what the PAM wrapper runs).

``pam-auth`` goes straight to the lean client (pam_client.py): pam_exec pays for its start-up on every login.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":
    if sys.argv[1:2] == ["pam-auth"]:
        from sekisho.agents.login.pam_client import main

        sys.exit(main(sys.argv[2:]))
    import logging

    from sekisho.agents.login.cli import pam_app

    # Errors go to stderr (pam_exec's `log=` or the journal); only the user message goes to stdout.
    logging.basicConfig(level=logging.WARNING, format="sekisho-pam-auth %(levelname)s %(name)s: %(message)s")
    sys.exit(pam_app(prog_name="sekisho-pam-auth"))
