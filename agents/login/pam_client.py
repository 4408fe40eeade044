"""`sekisho-agent pam-auth`: what pam_exec runs — a small client that asks the running terminal agent to decide.

pam_exec starts a new process for every PAM call, so everything this module imports is paid on every login.
It imports only the standard library's socket, json and struct (no typer, rich, pydantic, cryptography or
pyscard): the decision itself — the signed policy, the card's challenge–response, the finger, the signed
``login.granted`` / ``login.denied`` event — is made by ``PamService`` (agents/login/pam_service.py) inside
``sekisho-agent terminal``, which has all of that loaded and its reader and outbox open already.

Fail closed: exit 0 only when the agent answered with exit 0. No agent at the socket, a socket served by
anyone but root, no answer within the bounds below, a malformed answer: the call is refused. Only then does
this process load the agent's code (slowly) to record the refusal as ``login.denied`` ``internal_error`` in the
outbox (see ``pam.without_agent``); it never decides a login itself.

The exchange, one request per connection, every message one line of JSON:

- client → agent: ``{"v": 1, "terminal": ID, "env": {PAM_USER, PAM_TYPE, PAM_SERVICE, XDG_SESSION_ID, …}}``
  (at most ``MAX_REQUEST_BYTES``), then the client shuts its sending side;
- agent → client: ``{"within_s": S}`` at once (the longest the agent may take for the rest), then any number
  of ``{"say": TEXT}`` (printed to stdout, which pam_exec shows the person), then ``{"exit": 0|1}``; each line
  at most ``MAX_FRAME_BYTES``. The agent then closes the connection.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
import time

# typing itself is not imported at run time: every millisecond here is paid on every login.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import TextIO

DEFAULT_SOCKET = "/run/sekisho/pam/pam.sock"
PROTOCOL = 1
# Only these PAM variables are passed on to the agent; SEKISHO_LOGIN_SIMULATION is honoured there only when
# login.toml allows simulation (tests and the demo), and the installed wrapper starts with an empty environment.
SIMULATION_ENV = "SEKISHO_LOGIN_SIMULATION"
ENV_KEYS = ("PAM_USER", "PAM_SERVICE", "PAM_TYPE", "XDG_SESSION_ID", SIMULATION_ENV)
MAX_REQUEST_BYTES = 16 * 1024
MAX_VALUE_CHARS = 4096
MAX_FRAME_BYTES = 64 * 1024
# The agent must take the request and say how long it may need within this.
ACCEPT_S = 2.0
# Whatever the agent says, never wait longer: card_timeout_s (≤ 30) + fingerprint_timeout_s (≤ 120) + slack.
MAX_WAIT_S = 170.0
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid

USAGE = f"""Usage: sekisho-agent pam-auth --config AGENT_TOML --terminal ID [--socket PATH]

  For pam_exec: decide one PAM call (PAM_USER, PAM_TYPE, PAM_SERVICE from the environment) by asking the
  running terminal agent (sekisho-agent terminal) over its root-only socket. Exit 0 grants, 1 refuses; the
  call is refused when the agent is not running or does not answer in time.

Options:
  -c, --config PATH    agent TOML file (login.toml beside it); used only to record a refusal when the
                       agent cannot be asked, and for session bookkeeping while it is down
  -t, --terminal ID    terminal id in the site policy (must be the one the agent serves)
      --socket PATH    the agent's PAM socket [default: {DEFAULT_SOCKET}]
  -h, --help           show this message and exit
"""

_OPTIONS = {"--config": "config", "-c": "config", "--terminal": "terminal", "-t": "terminal", "--socket": "socket"}


class UsageError(Exception):
    """The command line is wrong."""


class Unavailable(Exception):
    """The agent could not be asked, or did not answer as it must: the call is refused."""


def parse_args(argv: list[str]) -> dict[str, str] | None:
    """Return the options (config, terminal, socket), or None when help was asked for."""
    options = {"socket": DEFAULT_SOCKET}
    args = iter(argv)
    for arg in args:
        if arg in ("-h", "--help"):
            return None
        name, eq, value = arg.partition("=")
        if name not in _OPTIONS:
            raise UsageError(f"unknown argument {arg!r}")
        if not eq:
            value = next(args, "")
            if not value:
                raise UsageError(f"{arg} needs a value")
        options[_OPTIONS[name]] = value
    missing = [f"--{name}" for name in ("config", "terminal") if not options.get(name)]
    if missing:
        raise UsageError(f"missing {' and '.join(missing)}")
    return options


def peer_uid(sock: socket.socket) -> int:
    """Return the uid of the process at the other end of a connected Unix socket (SO_PEERCRED)."""
    _, uid, _ = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return int(uid)


class _Lines:
    """Reads the agent's newline-terminated JSON objects, each bounded in size and in time."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buffer = b""

    def next(self, deadline: float) -> dict[str, object]:
        while b"\n" not in self._buffer:
            if len(self._buffer) > MAX_FRAME_BYTES:
                raise Unavailable("the agent sent an oversized message")
            left = deadline - time.monotonic()
            if left <= 0:
                raise Unavailable("the agent did not answer in time")
            self._sock.settimeout(left)
            try:
                chunk = self._sock.recv(MAX_FRAME_BYTES)
            except TimeoutError:
                raise Unavailable("the agent did not answer in time") from None
            except OSError as err:
                raise Unavailable(f"lost the agent: {err}") from None
            if not chunk:
                raise Unavailable("the agent closed the connection without a verdict")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        if len(line) > MAX_FRAME_BYTES:
            raise Unavailable("the agent sent an oversized message")
        try:
            frame = json.loads(line)
        except ValueError:
            raise Unavailable("the agent sent a malformed message") from None
        if not isinstance(frame, dict):
            raise Unavailable("the agent sent a malformed message")
        return frame


def ask_agent(path: str, terminal: str, env: dict[str, str], out: TextIO | None = None) -> int:
    """Send one PAM call to the agent at ``path``; print what it says; return its exit code (0 or 1).

    Raises ``Unavailable`` when the agent cannot be reached, is not root, or breaks the exchange.
    """
    stream = sys.stdout if out is None else out
    if any(len(value) > MAX_VALUE_CHARS for value in env.values()):
        raise Unavailable("a PAM variable is too long")
    request = json.dumps({"v": PROTOCOL, "terminal": terminal, "env": env}, separators=(",", ":")).encode()
    if len(request) >= MAX_REQUEST_BYTES:
        raise Unavailable("the request is too large")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        deadline = time.monotonic() + ACCEPT_S
        sock.settimeout(ACCEPT_S)
        try:
            sock.connect(path)
        except OSError as err:
            raise Unavailable(f"cannot reach the terminal agent at {path}: {err.strerror or err}") from None
        uid = peer_uid(sock)
        if uid not in (0, os.geteuid()):
            # Only root (the agent) may answer: anyone else at this path could grant logins.
            raise Unavailable(f"{path} is served by uid {uid}, not by root; not trusting it")
        try:
            sock.sendall(request + b"\n")
            sock.shutdown(socket.SHUT_WR)
        except OSError as err:
            raise Unavailable(f"cannot send to the terminal agent: {err}") from None
        lines = _Lines(sock)
        within = lines.next(deadline).get("within_s")
        if isinstance(within, bool) or not isinstance(within, int | float) or not within > 0:
            raise Unavailable("the agent did not accept the request")
        deadline = time.monotonic() + min(float(within), MAX_WAIT_S)
        while True:
            frame = lines.next(deadline)
            say = frame.get("say")
            if isinstance(say, str):
                stream.write(say)
                stream.flush()
            elif "exit" in frame:
                code = frame["exit"]
                return 0 if type(code) is int and code == 0 else 1
            else:
                raise Unavailable("the agent sent an unexpected message")


def main(argv: list[str] | None = None) -> int:
    """Run ``pam-auth``; return the exit code for pam_exec (0 grants, anything else refuses)."""
    try:
        options = parse_args(sys.argv[1:] if argv is None else argv)
    except UsageError as err:
        sys.stderr.write(f"sekisho-agent pam-auth: {err}\n{USAGE}")
        return 2
    if options is None:
        sys.stdout.write(USAGE)
        return 0
    env = {name: value for name in ENV_KEYS if (value := os.environ.get(name)) is not None}
    try:
        return ask_agent(options["socket"], options["terminal"], env)
    except Unavailable as err:
        detail = str(err)
    sys.stderr.write(f"sekisho-pam-auth: refusing: {detail}\n")
    sys.stdout.flush()
    try:
        # Only on this path: record the refusal (and keep the session registry) with the agent's own code.
        from pathlib import Path

        from sekisho.agents.login.pam import without_agent

        return without_agent(Path(options["config"]), options["terminal"], env, detail)
    except Exception as err:
        sys.stderr.write(f"sekisho-pam-auth: could not record the refusal either: {type(err).__name__}: {err}\n")
        try:
            from sekisho.agents.login.messages import bilingual

            sys.stdout.write(bilingual("internal_error") + "\n")
        except Exception as why:  # nothing more to say to the person; the exit code still refuses
            sys.stderr.write(f"sekisho-pam-auth: {why}\n")
        return 1
