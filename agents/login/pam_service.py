"""The terminal agent's side of ``sekisho-agent pam-auth``: decide PAM calls asked over a root-only Unix socket.

pam_exec starts ``pam-auth`` (pam_client.py) for every PAM call; it passes the call to this service, which
runs ``PamHelper`` — the same decision, the same events — with the agent's code already loaded and its
outbox already open, and answers with what to show the person and the exit code. The exchange is described
in pam_client.py.

Who may talk to whom:

- The socket lives in a directory of its own that must be owned by the agent's user with no access for group
  or others (created 0700 when missing; an existing one that is not is refused, as is a symlink); the
  socket itself is 0600.
- Each connection's peer is checked with ``SO_PEERCRED``: only root (or the agent's own user) is served;
  anyone else is closed on without a word. The client checks the same of the agent, so only root can answer
  for the agent; the decision is recorded as a signed event by the agent, whose key only root can read, so
  the answer on the socket needs no signature of its own.
- One request per connection, at most ``MAX_REQUEST_BYTES``, within ``REQUEST_S`` of connecting; anything
  malformed, unknown or oversized is closed on. At most ``MAX_CLIENTS`` calls at once; beyond that a
  connection is closed on at once (the client refuses the login and records it).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import socket
import stat
import threading
from collections.abc import Callable
from pathlib import Path

from sekisho.agents.login.pam import (
    HardwareFactory,
    LoginAgentSettings,
    LoginRecorder,
    LoginSetupError,
    PamHelper,
    load_login_settings,
)
from sekisho.agents.login.pam_client import (
    DEFAULT_SOCKET,
    ENV_KEYS,
    MAX_FRAME_BYTES,
    MAX_REQUEST_BYTES,
    MAX_VALUE_CHARS,
    MAX_WAIT_S,
    PROTOCOL,
    peer_uid,
)
from sekisho.agents.runtime.config import AgentConfig, load_config

log = logging.getLogger(__name__)

MAX_CLIENTS = 8
# A client must have sent its whole request this long after connecting.
REQUEST_S = 2.0
# A reply the client does not read within this is dropped (the call goes on and is recorded).
SEND_S = 5.0
# Besides the card and finger bounds: the policy, the outbox and session writes, fprintd's set-up calls.
SLACK_S = 15.0
_BACKLOG = 16
_ACCEPT_POLL_S = 0.5


class BadRequest(Exception):
    """A request that is not one well-formed PAM call."""


def _within_s(env: dict[str, str], config_path: Path) -> float:
    """Return the longest this call may take, as announced to the client."""
    if env.get("PAM_TYPE") != "auth":
        return SLACK_S
    try:
        settings = load_login_settings(config_path)
    except LoginSetupError:
        settings = LoginAgentSettings()  # the call will be refused at once; the bound hardly matters
    return min(settings.card_timeout_s + settings.fingerprint_timeout_s + SLACK_S, MAX_WAIT_S)


def parse_request(line: bytes) -> tuple[str, dict[str, str]]:
    """Return (terminal, env) from one request line; raise BadRequest for anything else."""
    try:
        doc = json.loads(line)
    except ValueError:
        raise BadRequest("not JSON") from None
    if not isinstance(doc, dict) or set(doc) != {"v", "terminal", "env"}:
        raise BadRequest("not a request object")
    if doc["v"] != PROTOCOL:
        raise BadRequest(f"protocol {doc['v']!r}, expected {PROTOCOL}")
    terminal, env = doc["terminal"], doc["env"]
    if not isinstance(terminal, str) or not 0 < len(terminal) <= 128:
        raise BadRequest("bad terminal")
    if not isinstance(env, dict) or not set(env) <= set(ENV_KEYS):
        raise BadRequest("unknown variables")
    if not all(isinstance(value, str) and len(value) <= MAX_VALUE_CHARS for value in env.values()):
        raise BadRequest("bad variable value")
    return terminal, env


def _read_request(conn: socket.socket) -> bytes:
    conn.settimeout(REQUEST_S)
    data = b""
    while b"\n" not in data:
        if len(data) >= MAX_REQUEST_BYTES:
            raise BadRequest("request too large")
        try:
            chunk = conn.recv(MAX_REQUEST_BYTES)
        except TimeoutError:
            raise BadRequest("no complete request in time") from None
        if not chunk:
            raise BadRequest("connection closed before a complete request")
        data += chunk
    line = data.partition(b"\n")[0]
    if len(line) >= MAX_REQUEST_BYTES:
        raise BadRequest("request too large")
    return line


class Replies(io.StringIO):
    """Sends the client its lines; ``PamHelper`` prints to it as to stdout, each flush one ``say`` line.

    A client that went away never interrupts the call: the decision is still made and recorded.
    """

    def __init__(self, conn: socket.socket) -> None:
        super().__init__()
        self._conn = conn
        self.broken = False

    def send(self, frame: dict[str, object]) -> None:
        if self.broken:
            return
        data = json.dumps(frame, ensure_ascii=False, separators=(",", ":")).encode()
        if len(data) >= MAX_FRAME_BYTES:
            data = json.dumps({"say": "(message too long)\n"}).encode()
        try:
            self._conn.sendall(data + b"\n")
        except OSError as err:
            self.broken = True
            log.warning("PAM client went away: %s", err)

    def flush(self) -> None:
        """Send what was printed since the last flush (print(..., flush=True) calls this)."""
        if self.closed:
            return
        text = self.getvalue()
        if text:
            self.seek(0)
            self.truncate(0)
            self.send({"say": text})


def _check_directory(directory: Path) -> None:
    """Create the socket's directory 0700, or refuse one that others could reach or replace."""
    with contextlib.suppress(FileExistsError):
        directory.mkdir(mode=0o700, parents=True)
    info = os.lstat(directory)
    if not stat.S_ISDIR(info.st_mode):
        raise LoginSetupError(f"{directory} is not a directory (a symlink?); refusing to put the PAM socket there")
    if info.st_uid != os.geteuid() or info.st_mode & 0o077:
        raise LoginSetupError(
            f"{directory} must be owned by uid {os.geteuid()} with mode 0700 (it is uid {info.st_uid}, "
            f"mode {stat.S_IMODE(info.st_mode):o}); refusing to put the PAM socket there"
        )


class PamService:
    """Serves PAM calls on ``socket_path`` for ``terminal`` until ``stop()``."""

    def __init__(
        self,
        config_path: Path,
        terminal: str,
        *,
        socket_path: Path = Path(DEFAULT_SOCKET),
        config: AgentConfig | None = None,
        hardware: HardwareFactory | None = None,
        on_recorded: Callable[[], None] | None = None,
        max_clients: int = MAX_CLIENTS,
    ) -> None:
        self.config_path = config_path
        self.terminal = terminal
        self.socket_path = socket_path
        self._config = config
        self._hardware = hardware
        self._on_recorded = on_recorded
        self._max_clients = max_clients
        self._active = 0
        self._mutex = threading.Lock()
        self._listener: socket.socket | None = None
        self._inode: int | None = None
        self._recorder: LoginRecorder | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self.allowed_uids = frozenset({0, os.geteuid()})

    def start(self) -> PamService:
        """Bind the socket and start answering (the outbox is opened by the first call)."""
        config = self._config if self._config is not None else load_config(self.config_path)
        self._config = config
        path = self.socket_path
        if len(os.fsencode(path)) > 107:
            raise LoginSetupError(f"PAM socket path {path} is too long for a Unix socket")
        _check_directory(path.parent)
        self._remove_stale(path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # The directory is 0700, so the socket is unreachable before the chmod as well.
            listener.bind(str(path))
            os.chmod(path, 0o600)
            self._inode = os.lstat(path).st_ino
            listener.listen(_BACKLOG)
            listener.settimeout(_ACCEPT_POLL_S)
        except BaseException:
            listener.close()
            raise
        self._listener = listener
        self._stopping.clear()
        self._thread = threading.Thread(target=self._accept_loop, name="pam-service", daemon=True)
        self._thread.start()
        log.info("answering PAM calls for terminal %s on %s", self.terminal, path)
        return self

    @property
    def running(self) -> bool:
        """Tell whether the accept loop is alive (the service watchdog asks)."""
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        """Stop accepting, remove the socket and close the outbox (calls in progress finish on their own)."""
        self._stopping.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(_ACCEPT_POLL_S * 4)
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
            with contextlib.suppress(OSError):
                if os.lstat(self.socket_path).st_ino == self._inode:
                    os.unlink(self.socket_path)
        with self._mutex:
            if self._active == 0:
                self._close_recorder()
            # else: the last call to finish closes it

    def _open_recorder(self) -> LoginRecorder | None:
        # One connection to the outbox for all calls (opening one checks the whole file). If it cannot be
        # opened now, the call tries on its own and refuses as internal_error when it cannot either.
        with self._mutex:
            if self._recorder is None and self._config is not None:
                try:
                    self._recorder = LoginRecorder(self._config)
                except Exception:
                    log.exception("PAM socket: cannot open the outbox")
            return self._recorder

    def _close_recorder(self) -> None:
        recorder, self._recorder = self._recorder, None
        if recorder is not None:
            recorder.close()

    def __enter__(self) -> PamService:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _remove_stale(self, path: Path) -> None:
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(info.st_mode):
            raise LoginSetupError(f"{path} exists and is not a socket; refusing to replace it")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(1.0)
            try:
                probe.connect(str(path))
            except OSError:
                os.unlink(path)  # left behind by an agent that is gone
                return
        raise LoginSetupError(f"another process already answers PAM calls on {path}")

    def _accept_loop(self) -> None:
        listener = self._listener
        assert listener is not None
        while not self._stopping.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError as err:
                if self._stopping.is_set():
                    return
                log.warning("PAM socket accept failed: %s", err)
                self._stopping.wait(0.1)
                continue
            try:
                uid = peer_uid(conn)
            except OSError:
                uid = -1
            if uid not in self.allowed_uids:
                log.warning("PAM socket: refused a connection from uid %s (only root may ask)", uid)
                conn.close()
                continue
            with self._mutex:
                busy = self._active >= self._max_clients
                if not busy:
                    self._active += 1
            if busy:
                log.warning("PAM socket: %d calls already in progress; refusing another", self._max_clients)
                conn.close()
                continue
            threading.Thread(target=self._serve, args=(conn,), name="pam-call", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            with conn:
                try:
                    terminal, env = parse_request(_read_request(conn))
                except (BadRequest, OSError) as err:
                    log.warning("PAM socket: dropped a request: %s", err)
                    return
                conn.settimeout(SEND_S)
                replies = Replies(conn)
                replies.send({"within_s": _within_s(env, self.config_path)})
                code = self.handle(terminal, env, replies)
                replies.flush()
                replies.send({"exit": code})
        except Exception:
            log.exception("PAM socket: a call failed")
        finally:
            with self._mutex:
                self._active -= 1
                if self._stopping.is_set() and self._active == 0:
                    self._close_recorder()

    def handle(self, terminal: str, env: dict[str, str], out: Replies) -> int:
        """Decide one PAM call (the exit code), printing to ``out`` what the person should read."""
        helper = PamHelper(
            self.config_path,
            self.terminal,
            env,
            out,
            config=self._config,
            recorder=self._open_recorder(),
            hardware=self._hardware,
        )
        try:
            if terminal != self.terminal:
                return helper.refuse(
                    LoginSetupError(f"pam-auth asks for terminal {terminal!r}; this agent serves {self.terminal!r}")
                )
            return helper.run()
        finally:
            if self._on_recorded is not None:
                try:
                    self._on_recorded()
                except Exception:
                    log.exception("PAM socket: waking the sender failed")
