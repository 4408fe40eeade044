"""`pam-auth` asks the running terminal agent over a root-only Unix socket; both ends fail closed.

The service runs here as `sekisho-agent terminal` runs it (agents/login/pam_service.py); the client is the
function pam_exec's process runs (agents/login/pam_client.py), in this process or as a real subprocess.
The decisions themselves are covered through pamtester in test_login_pam.py and test_login_pam_real.py.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from agent_fixtures import write_agent_config
from test_login_pam import TERMINAL, Terminal, _key

from sekisho.agents.login.messages import message
from sekisho.agents.login.pam import LoginSetupError
from sekisho.agents.login.pam_client import (
    ACCEPT_S,
    MAX_REQUEST_BYTES,
    SIMULATION_ENV,
    Unavailable,
    ask_agent,
    main,
    parse_args,
)
from sekisho.agents.login.pam_service import BadRequest, PamService, parse_request
from sekisho.agents.login.sessions import LoginSessions
from sekisho.deploy.pki import PkiPaths, issue_agent
from sekisho.protocol import signing

NOBODY = 65534
# Processes run as nobody use the system's Python (stdlib only): the venv's may live under /root.
SYSTEM_PYTHON = "/usr/bin/python3"
as_root = pytest.mark.skipif(
    os.geteuid() != 0 or not Path(SYSTEM_PYTHON).exists(), reason="needs root (and /usr/bin/python3) to act as nobody"
)


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory under /tmp that nobody can reach (pytest's own temp directories are root-only)."""
    path = Path(tempfile.mkdtemp(prefix="sekisho-pam-"))
    path.chmod(0o711)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def term(pki: Path, tmp_path: Path) -> Iterator[Terminal]:
    """An agent with a valid policy, simulated hardware allowed, and its PAM service on a temp socket."""
    agent = f"ps-{secrets.token_hex(4)}"
    config = write_agent_config(tmp_path / "agent.toml", issue_agent(pki, agent), 8883)
    site_key = secrets.token_hex(32).encode()
    (tmp_path / "site.key").write_bytes(site_key)
    (tmp_path / "login.toml").write_text('site_key_file = "site.key"\nsimulation_allowed = true\n')
    cards = {
        "c-alice": (bytes.fromhex("04A1B2C3D4E5F6"), _key()),
        "c-bob": (bytes.fromhex("04B0B0B0B0B0B0"), _key()),
    }
    controller_key = signing.load_private_key(PkiPaths.at(pki).controller_signing_key)
    t = Terminal(agent, tmp_path, config, "", tmp_path / "scenario.json", site_key, controller_key, cards)
    t.install_bundle(1, t.policy_doc())
    t.set_scenario("c-alice", "match")
    t.pam = PamService(config, TERMINAL, socket_path=tmp_path / "pam" / "pam.sock").start()
    try:
        yield t
    finally:
        t.pam.stop()


def _socket(t: Terminal) -> str:
    assert t.pam is not None
    return str(t.pam.socket_path)


def _env(t: Terminal, user: str = "alice", pam_type: str = "auth") -> dict[str, str]:
    return {"PAM_USER": user, "PAM_TYPE": pam_type, "PAM_SERVICE": "login", SIMULATION_ENV: str(t.scenario)}


def _pam_env(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)


# --- the exchange --------------------------------------------------------------------------------------


def test_the_agent_decides_and_records(term: Terminal) -> None:
    out = io.StringIO()
    assert ask_agent(_socket(term), TERMINAL, _env(term), out) == 0
    assert message("granted") in out.getvalue()
    event = term.last_event()
    assert (event.type, event.payload["user"], event.payload["person"]) == ("login.granted", "alice", "p-alice")
    term.set_scenario(None)
    out = io.StringIO()
    assert ask_agent(_socket(term), TERMINAL, _env(term), out) == 1
    assert message("no_card") in out.getvalue()
    assert (term.last_event().type, term.last_event().payload["reason"]) == ("login.denied", "no_card")


def test_the_prompt_reaches_the_person_before_the_verdict(term: Terminal) -> None:
    out = io.StringIO()
    assert ask_agent(_socket(term), TERMINAL, _env(term), out) == 0
    text = out.getvalue()
    assert text.index(message("touch_sensor")) < text.index(message("granted"))


def test_a_call_for_another_terminal_is_refused_and_recorded(term: Terminal) -> None:
    out = io.StringIO()
    assert ask_agent(_socket(term), "t-other", _env(term), out) == 1
    assert message("internal_error") in out.getvalue()
    event = term.last_event()
    assert (event.type, event.payload["reason"], event.payload["terminal"]) == (
        "login.denied",
        "internal_error",
        TERMINAL,
    )
    assert "t-other" in event.payload["detail"]


def test_the_session_calls_go_through_the_agent(term: Terminal) -> None:
    assert ask_agent(_socket(term), TERMINAL, _env(term), io.StringIO()) == 0
    env = _env(term, pam_type="open_session") | {"XDG_SESSION_ID": "7"}
    assert ask_agent(_socket(term), TERMINAL, env, io.StringIO()) == 0
    registry = LoginSessions(term.state)
    try:
        [session] = registry.active()
        assert (session.user, session.state, session.session_id) == ("alice", "open", "7")
        assert ask_agent(_socket(term), TERMINAL, _env(term, pam_type="close_session"), io.StringIO()) == 0
        assert registry.active() == []
    finally:
        registry.close()
    assert (term.last_event().type, term.last_event().payload["cause"]) == ("session.ended", "logout")


# --- the agent is down or misbehaves: refused, and recorded by the client itself --------------------------


def test_no_agent_refuses_and_records_internal_error(
    term: Terminal, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert term.pam is not None
    term.pam.stop()
    assert not term.pam.socket_path.exists()
    before = term.event_count()
    _pam_env(monkeypatch, _env(term))
    argv = ["--config", str(term.config), "--terminal", TERMINAL, "--socket", _socket(term)]
    assert main(argv) == 1
    assert message("internal_error") in capsys.readouterr().out
    assert term.event_count() == before + 1
    event = term.last_event()
    assert (event.type, event.payload["reason"], event.payload["user"]) == ("login.denied", "internal_error", "alice")
    assert "did not decide" in event.payload["detail"] and "cannot reach" in event.payload["detail"]


def test_no_agent_still_records_the_logout(term: Terminal, monkeypatch: pytest.MonkeyPatch) -> None:
    assert ask_agent(_socket(term), TERMINAL, _env(term), io.StringIO()) == 0
    assert term.pam is not None
    term.pam.stop()
    _pam_env(monkeypatch, _env(term, pam_type="close_session"))
    assert main(["-c", str(term.config), "-t", TERMINAL, f"--socket={_socket(term)}"]) == 0
    assert (term.last_event().type, term.last_event().payload["cause"]) == ("session.ended", "logout")


def _silent_server(path: Path, replies: list[bytes]) -> tuple[socket.socket, threading.Event]:
    """A listener at ``path`` that accepts, sends ``replies`` and then says nothing until the event is set."""
    path.parent.mkdir(mode=0o700, exist_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    done = threading.Event()

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            for reply in replies:
                conn.sendall(reply)
            done.wait(ACCEPT_S * 5)

    threading.Thread(target=serve, daemon=True).start()
    return listener, done


@pytest.mark.parametrize(
    ("replies", "why"),
    [
        ([], "did not answer in time"),
        ([b'{"within_s": 0.5}\n'], "did not answer in time"),
        ([b'{"within_s": 5}\n{"say": "ok"}\n', b"x" * 70_000], "oversized"),
        ([b'{"within_s": 5}\n{"exit": true}\n'], None),
        ([b'{"within_s": 5}\nnot json\n'], "malformed"),
        ([b'{"within_s": -1}\n'], "did not accept"),
    ],
    ids=["silent", "stops after accepting", "endless line", "exit true is not 0", "garbage", "bad bound"],
)
def test_an_agent_that_breaks_the_exchange_never_grants(tmp_path: Path, replies: list[bytes], why: str | None) -> None:
    path = tmp_path / "s" / "pam.sock"
    listener, done = _silent_server(path, replies)
    try:
        if why is None:
            assert ask_agent(str(path), TERMINAL, {"PAM_USER": "alice", "PAM_TYPE": "auth"}, io.StringIO()) == 1
        else:
            with pytest.raises(Unavailable, match=why):
                ask_agent(str(path), TERMINAL, {"PAM_USER": "alice", "PAM_TYPE": "auth"}, io.StringIO())
    finally:
        done.set()
        listener.close()


@as_root
def test_an_answer_from_a_socket_not_served_by_root_is_not_trusted(open_dir: Path) -> None:
    # Someone other than root listens at the path and would grant everything.
    home = open_dir / "impostor"
    home.mkdir()
    os.chown(home, NOBODY, NOBODY)
    path = home / "pam.sock"
    server = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen(1); print('up', flush=True)\n"
        'c, _ = s.accept(); c.sendall(b\'{"within_s": 5}\\n{"exit": 0}\\n\'); c.recv(1)\n'
    )
    argv = [SYSTEM_PYTHON, "-I", "-c", server, str(path)]
    with subprocess.Popen(argv, user=NOBODY, stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "up"
            with pytest.raises(Unavailable, match=f"uid {NOBODY}"):
                ask_agent(str(path), TERMINAL, {"PAM_USER": "alice", "PAM_TYPE": "auth"}, io.StringIO())
        finally:
            proc.kill()


# --- the agent's side of the socket ----------------------------------------------------------------------


def test_the_socket_is_0600_in_a_0700_directory(term: Terminal) -> None:
    assert term.pam is not None
    path = term.pam.socket_path
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.parent.stat().st_mode & 0o777 == 0o700


@pytest.mark.parametrize("mode", [0o755, 0o710, 0o702])
def test_a_directory_others_can_reach_is_refused(pki: Path, tmp_path: Path, mode: int) -> None:
    config = write_agent_config(tmp_path / "agent.toml", issue_agent(pki, f"ps-{secrets.token_hex(4)}"), 8883)
    directory = tmp_path / "pam"
    directory.mkdir()
    directory.chmod(mode)
    with pytest.raises(LoginSetupError, match="mode 0700"):
        PamService(config, TERMINAL, socket_path=directory / "pam.sock").start()


def test_a_symlinked_directory_is_refused(pki: Path, tmp_path: Path) -> None:
    config = write_agent_config(tmp_path / "agent.toml", issue_agent(pki, f"ps-{secrets.token_hex(4)}"), 8883)
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "pam").symlink_to(real)
    with pytest.raises(LoginSetupError, match="symlink"):
        PamService(config, TERMINAL, socket_path=tmp_path / "pam" / "pam.sock").start()


def test_a_second_service_on_the_same_socket_is_refused_and_a_stale_one_replaced(term: Terminal) -> None:
    assert term.pam is not None
    with pytest.raises(LoginSetupError, match="already answers"):
        PamService(term.config, TERMINAL, socket_path=term.pam.socket_path).start()
    assert ask_agent(_socket(term), TERMINAL, _env(term), io.StringIO()) == 0  # the first one is untouched
    term.pam.stop()
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(_socket(term))  # bound, never listening: what a killed agent leaves behind
    stale.close()
    term.pam = PamService(term.config, TERMINAL, socket_path=term.pam.socket_path).start()
    assert ask_agent(_socket(term), TERMINAL, _env(term), io.StringIO()) == 0


def _raw(t: Terminal, data: bytes) -> bytes:
    """Send ``data`` on one connection and return everything the agent answers before closing it."""
    answer = b""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(_socket(t))
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            while chunk := sock.recv(65536):
                answer += chunk
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed on with unread data: what an oversized request gets
    return answer


def _request(t: Terminal, **changes: object) -> bytes:
    doc = {"v": 1, "terminal": TERMINAL, "env": _env(t)} | changes
    return json.dumps(doc).encode() + b"\n"


@pytest.mark.parametrize(
    "data",
    [
        b"not json\n",
        b'{"v": 1}\n',
        b"x" * (MAX_REQUEST_BYTES + 10) + b"\n",
        b'{"v": 1, "terminal": "t-hr-01", "env": {"PAM_USER": "alice"}',  # no newline: never complete
    ],
    ids=["garbage", "incomplete object", "oversized", "unterminated"],
)
def test_malformed_requests_get_no_answer_and_record_nothing(term: Terminal, data: bytes) -> None:
    before = term.event_count()
    assert _raw(term, data) == b""
    assert term.event_count() == before


def test_unknown_variables_and_versions_are_refused(term: Terminal) -> None:
    before = term.event_count()
    assert _raw(term, _request(term, env=_env(term) | {"SEKISHO_AGENT_STATE_DIR": "/tmp/x"})) == b""
    assert _raw(term, _request(term, v=2)) == b""
    assert _raw(term, _request(term, extra=1)) == b""
    assert term.event_count() == before


def test_one_request_per_connection(term: Terminal) -> None:
    before = term.event_count()
    answer = _raw(term, _request(term) + _request(term, env=_env(term, user="bob")))
    lines = [json.loads(line) for line in answer.splitlines()]
    assert lines[0]["within_s"] > 0 and lines[-1] == {"exit": 0}
    assert term.event_count() == before + 1 and term.last_event().payload["user"] == "alice"


@as_root
def test_a_caller_that_is_not_root_gets_no_answer(term: Terminal, open_dir: Path) -> None:
    assert term.pam is not None
    term.pam.stop()
    term.pam = PamService(term.config, TERMINAL, socket_path=open_dir / "pam" / "pam.sock").start()
    # Open the way for this test only: the socket's 0700 directory would otherwise stop the caller first.
    term.pam.socket_path.parent.chmod(0o711)
    term.pam.socket_path.chmod(0o666)
    before = term.event_count()
    probe = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n"
        "try:\n"
        "    s.sendall(sys.argv[2].encode()); s.shutdown(socket.SHUT_WR); print(repr(s.recv(65536)))\n"
        "except ConnectionError:\n"
        "    print(repr(b''))\n"
    )
    done = subprocess.run(
        [SYSTEM_PYTHON, "-I", "-c", probe, _socket(term), _request(term).decode()],
        user=NOBODY,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "b''"
    assert term.event_count() == before


def test_parse_request_accepts_only_pam_variables() -> None:
    assert parse_request(b'{"v": 1, "terminal": "t", "env": {"PAM_USER": "a"}}') == ("t", {"PAM_USER": "a"})
    for bad in (
        b'{"v": 1, "terminal": "t", "env": {"PATH": "/tmp"}}',
        b'{"v": 1, "terminal": "t", "env": {"PAM_USER": 1}}',
        b'{"v": 1, "terminal": "", "env": {}}',
        b"[]",
    ):
        with pytest.raises(BadRequest):
            parse_request(bad)


def test_parse_args() -> None:
    assert parse_args(["--config", "a.toml", "-t", "t1"]) == {
        "config": "a.toml",
        "terminal": "t1",
        "socket": "/run/sekisho/pam/pam.sock",
    }
    assert parse_args(["-c", "a.toml", "--terminal=t1", "--socket", "/x"])["socket"] == "/x"  # type: ignore[index]
    assert parse_args(["--config", "a", "--help"]) is None
    for bad in (["--config", "a"], ["--terminal", "t"], ["-c", "a", "-t"], ["-c", "a", "-t", "t", "--user", "x"]):
        with pytest.raises(Exception, match=r"missing|needs a value|unknown"):
            parse_args(bad)


# --- what pam_exec's process loads --------------------------------------------------------------------

_HEAVY = ("typer", "rich", "click", "pydantic", "cryptography", "smartcard", "jeepney", "sqlite3", "sekisho.protocol")
_LOADED = (
    "import sys\n"
    "from sekisho.entry import agent_main\n"
    "try:\n"
    "    agent_main(sys.argv[1:])\n"
    "except SystemExit as exit:\n"
    "    code = exit.code\n"
    f"heavy = sorted(m for m in sys.modules if m.startswith({_HEAVY!r}))\n"
    "print(f'exit={code} heavy={heavy}', file=sys.stderr)\n"
)


def test_pam_auth_loads_none_of_the_agent_stack(term: Terminal) -> None:
    argv = ["pam-auth", "--config", str(term.config), "--terminal", TERMINAL, "--socket", _socket(term)]
    env = {"PATH": "/usr/bin:/bin"} | _env(term)
    for args in (argv, ["pam-auth", "--help"]):
        done = subprocess.run(
            [sys.executable, "-I", "-c", _LOADED, *args],
            env=env,
            cwd="/",
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert "exit=0 heavy=[]" in done.stderr, done.stderr
    assert term.last_event().type == "login.granted"
