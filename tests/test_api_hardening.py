"""API hardening (issue 10, item 7): no open API off loopback, failed authentication throttled and logged
without the token, read-only vs write tokens, /readyz detail only with a token, database files 0600 in 0700.

Since the console accounts (issue 12) the shared tokens are legacy service principals: api_tokens act as the
role it_admin, api_read_tokens as auditor, and the role matrix (controller/accounts/roles.py) decides.

Each refusal goes through FastAPI's TestClient on a real SQLite store; the binding refusal and the file modes
also through a real `sekisho controller serve` (the last test, with a real broker).
"""

from __future__ import annotations

import json
import logging
import re
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from email.message import Message
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr, ValidationError
from sqlalchemy import text
from support.lab import lab_on
from support.site import wait_for
from test_media import site_yaml

from sekisho.controller.accounts.roles import Role
from sekisho.controller.api.app import create_app
from sekisho.controller.api.auth import (
    ApiAuth,
    FailedAuthLimiter,
    Scope,
    Throttled,
    Unauthenticated,
    client_key,
)
from sekisho.controller.api.deps import AppState
from sekisho.controller.config import ControllerConfig, is_loopback, load_config
from sekisho.controller.ingest.worker import IngestStats
from sekisho.controller.policy.loader import parse_policy
from sekisho.controller.policy.service import PolicyService
from sekisho.controller.service import open_store
from sekisho.controller.store import Store, make_engine, upgrade
from sekisho.lab import write_toml
from sekisho.protocol import signing, timefmt

WRITE = "w" * 32
READ = "r" * 32
WRONG = "x" * 32
BASE = {"ca_cert": "ca.pem", "tls_cert": "c.pem", "tls_key": "c.key", "signing_key": "signing.key"}


class Clock:
    """A clock the test moves by hand (the limiter's windows without sleeping)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Api:
    state: AppState
    store: Store
    clock: Clock

    def client(self, token: str | None = None, address: str = "192.0.2.10") -> TestClient:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return TestClient(create_app(self.state), headers=headers, client=(address, 50000))


def _config(tmp_path: Path, **overrides: Any) -> ControllerConfig:
    values: dict[str, Any] = {
        "profile": "production",
        "var_dir": tmp_path,
        "ca_cert": tmp_path / "ca.pem",
        "tls_cert": tmp_path / "c.pem",
        "tls_key": tmp_path / "c.key",
        "signing_key": tmp_path / "signing.key",
        "api_tokens": [SecretStr(WRITE)],
        "api_read_tokens": [SecretStr(READ)],
        "api_auth_failures": 10,
        "api_auth_window_s": 60,
    }
    values.update(overrides)
    return ControllerConfig(**values)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    engine = make_engine(f"sqlite:///{tmp_path / 'controller.db'}")
    upgrade(engine)
    store = Store(engine)
    key = signing.generate_key()
    (tmp_path / "signing.key").write_bytes(signing.private_key_pem(key))
    PolicyService(store, key).apply(parse_policy(site_yaml()), source_sha256="0" * 64, created_by="test")
    try:
        yield store
    finally:
        engine.dispose()


def make_api(tmp_path: Path, store: Store, ingest: IngestStats | None = None, **overrides: Any) -> Api:
    clock = Clock()
    state = AppState(_config(tmp_path, **overrides), store, ingest)
    state.auth = ApiAuth.from_config(state.config, clock=clock)
    return Api(state, store, clock)


@pytest.fixture
def api(tmp_path: Path, store: Store) -> Api:
    return make_api(tmp_path, store)


def _loan() -> dict[str, Any]:
    return {
        "medium": "m-0001",
        "person": "p-0001",
        "terminals": ["t-hr-01"],
        "ends_at": (timefmt.now() + timedelta(days=1)).isoformat(),
        "purpose": "年末調整データ (test)",
        "approved_by": "p-0002",
        "recorded_by": "p-0002",
    }


# --- 1. no open API off loopback -------------------------------------------------------------------


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "", "192.168.1.5", "controller.example.internal", "::ffff:10.0.0.1"])
def test_the_open_dev_profile_is_refused_off_loopback(host: str) -> None:
    with pytest.raises(ValidationError, match="api_tokens"):
        ControllerConfig(**BASE, profile="dev", http_host=host)


def test_production_without_shared_tokens_is_closed(tmp_path: Path, store: Store) -> None:
    # Console users and their own tokens authenticate now; production never opens up without tokens.
    config = ControllerConfig(**BASE, http_host="0.0.0.0")
    assert config.api_tokens == [] and config.api_read_tokens == []
    api = make_api(tmp_path, store, api_tokens=[], api_read_tokens=[])
    assert api.client().get("/api/v1/events").status_code == 401
    assert api.client().post("/api/v1/media/loans", json=_loan()).status_code == 401


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.9.10", "::1", "localhost", "LOCALHOST", "::ffff:127.0.0.1"])
def test_dev_without_tokens_may_bind_loopback(host: str) -> None:
    assert is_loopback(host)
    assert ControllerConfig(**BASE, profile="dev", http_host=host).http_host == host


def test_tokens_allow_any_address_and_each_token_has_one_scope() -> None:
    assert ControllerConfig(**BASE, profile="dev", http_host="0.0.0.0", api_tokens=[WRITE]).api_tokens
    # A read-only API is allowed (writes then go through the CLI only).
    assert ControllerConfig(**BASE, http_host="0.0.0.0", api_read_tokens=[READ]).api_read_tokens
    with pytest.raises(ValidationError, match="1 回だけ指定できます"):  # tests run in ja
        ControllerConfig(**BASE, api_tokens=[WRITE], api_read_tokens=[WRITE])
    with pytest.raises(ValidationError, match="24 文字以上"):
        ControllerConfig(**BASE, api_tokens=[WRITE], api_read_tokens=["short"])


def test_config_file_and_serve_refuse_an_open_api_on_the_network(tmp_path: Path) -> None:
    config = write_toml(tmp_path / "controller.toml", {"profile": "dev", "http_host": "0.0.0.0", **BASE})
    with pytest.raises(ValidationError, match="not a loopback address"):
        load_config(config)
    served = subprocess.run(
        [sys.executable, "-m", "sekisho", "controller", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert served.returncode == 2, served.stdout + served.stderr
    assert "not a loopback address" in " ".join(served.stderr.split())
    assert not (tmp_path / "controller.db").exists()


# --- 2. failed authentication: throttled per address, logged without the token --------------------


def test_a_token_guessing_burst_is_locked_out_and_logged_without_the_tokens(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="sekisho.controller.api.auth")
    attacker = api.client(WRONG)
    codes = [attacker.get("/api/v1/events").status_code for _ in range(150)]
    assert codes[:10] == [401] * 10 and codes[10:] == [429] * 140
    refused = attacker.get("/api/v1/events")
    assert refused.status_code == 429 and 1 <= int(refused.headers["Retry-After"]) <= 60

    # The right token from the locked-out address is not even looked at: no oracle for the attacker.
    same_nat = api.client(WRITE)
    assert same_nat.get("/api/v1/events").status_code == 429
    assert same_nat.post("/api/v1/media/loans", json=_loan()).status_code == 429
    # Another address is not affected.
    assert api.client(WRITE, address="198.51.100.7").get("/api/v1/events").status_code == 200

    failures = [r for r in caplog.records if "authentication failed" in r.getMessage()]
    assert len(failures) == 10 and "192.0.2.10" in failures[0].getMessage()
    assert "wrong token on GET /api/v1/events" in failures[0].getMessage()
    assert sum("locked out" in r.getMessage() for r in caplog.records) == 1
    assert not [r for r in caplog.records if WRONG in r.getMessage() or WRITE in r.getMessage()]
    assert WRONG not in caplog.text and WRITE not in caplog.text

    detail = api.client(READ, address="198.51.100.7").get("/readyz").json()["checks"]["api_auth"]
    assert detail == {"failures": 10, "throttled": 143, "locked_out": 1, "tracked": 1, "forgotten": 0}

    # The lock-out ends after the window: the right token works again, a wrong one counts from zero.
    api.clock.now += 61
    assert same_nat.get("/api/v1/events").status_code == 200
    assert attacker.get("/api/v1/events").status_code == 401


def test_missing_tokens_count_as_failures_and_ipv6_counts_per_64(api: Api) -> None:
    for n in range(10):
        # Ten addresses of one /64: one host, one count.
        assert api.client(address=f"2001:db8:1:2::{n + 1}").get("/api/v1/agents").status_code == 401
    assert api.client(WRITE, address="2001:db8:1:2::ff").get("/api/v1/agents").status_code == 429
    assert api.client(WRITE, address="2001:db8:1:3::1").get("/api/v1/agents").status_code == 200
    assert client_key("2001:db8:1:2:aaaa::1") == "2001:db8:1:2::/64"
    assert client_key("::ffff:192.0.2.1") == "192.0.2.1" and client_key(None) == "unknown"


def test_the_limiter_memory_is_bounded_and_forgets_stale_addresses() -> None:
    clock = Clock()
    limiter = FailedAuthLimiter(max_failures=3, window_s=60, max_clients=50, clock=clock)
    for n in range(1000):
        limiter.failed(f"10.0.{n // 256}.{n % 256}", "wrong token on GET /x")
    counts = limiter.counts()
    assert counts["tracked"] == 50 and counts["forgotten"] == 950 and counts["failures"] == 1000
    # Every address that failed a window ago is dropped at the next failure.
    clock.now += 61
    limiter.failed("10.9.9.9", "no token on GET /x")
    assert limiter.counts()["tracked"] == 1
    # A lock-out outlives its window only while locked: three failures lock, the lock ends after 60 s.
    for _ in range(3):
        limiter.failed("10.9.9.9", "wrong token on GET /x")
    assert limiter.retry_after("10.9.9.9") == 60
    clock.now += 60
    assert limiter.retry_after("10.9.9.9") is None


def test_authentication_outcomes_without_http(tmp_path: Path) -> None:
    auth = ApiAuth.from_config(_config(tmp_path, api_auth_failures=2), clock=Clock())
    writer = auth.authenticate(WRITE, "192.0.2.1", "GET /x")
    reader = auth.authenticate(READ, "192.0.2.1", "GET /x")
    assert writer.may(Scope.WRITE) and writer.may(Scope.READ) and writer.name == "api_tokens[0]"
    assert reader.may(Scope.READ) and not reader.may(Scope.WRITE) and reader.name == "api_read_tokens[0]"
    with pytest.raises(Unauthenticated):
        auth.authenticate(None, "192.0.2.1", "GET /x")
    with pytest.raises(Unauthenticated):
        auth.authenticate(WRONG, "192.0.2.1", "GET /x")
    with pytest.raises(Throttled):
        auth.authenticate(WRITE, "192.0.2.1", "GET /x")


# --- 3. read-only and write tokens -----------------------------------------------------------------


def test_a_read_token_reads_but_may_not_write(api: Api, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    reader = api.client(READ)
    for path in ("/api/v1/events", "/api/v1/media", "/api/v1/media/loans", "/api/v1/keys/loans", "/api/v1/visits"):
        assert reader.get(path).status_code == 200, path
    refused = reader.post("/api/v1/media/loans", json=_loan())
    assert refused.status_code == 403 and "media.lend がありません" in refused.json()["detail"]
    english = reader.post("/api/v1/media/loans", json=_loan(), headers={"Accept-Language": "en"})
    assert english.json() == {"detail": "the role auditor lacks the permission media.lend"}
    assert reader.post("/api/v1/media/loans/1/return", json={"received_by": "p-0002"}).status_code == 403
    assert reader.post("/api/v1/media/loans/1/revoke", json={"reason": "x", "recorded_by": "p-0002"}).status_code == 403
    assert reader.get("/api/v1/media/loans").json() == []
    assert "token:api_read_tokens[0] (auditor) refused on POST /api/v1/media/loans" in caplog.text
    assert READ not in caplog.text

    # A refused scope is no failed authentication: the reader is not locked out.
    for _ in range(20):
        assert reader.post("/api/v1/media/loans", json=_loan()).status_code == 403
    assert reader.get("/api/v1/events").status_code == 200

    # A token in api_tokens (a plain token, as before scopes existed) writes.
    made = api.client(WRITE).post("/api/v1/media/loans", json=_loan())
    assert made.status_code == 201, made.text
    assert [loan["id"] for loan in reader.get("/api/v1/media/loans").json()] == [made.json()["loan"]["id"]]


def test_every_api_route_is_classified_in_one_place(tmp_path: Path, store: Store) -> None:
    # The one place is now the role matrix; the legacy read token is the read-only auditor role.
    api = make_api(tmp_path, store, api_auth_failures=1000)
    anonymous, reader = api.client(), api.client(READ)
    operations = [
        (method.upper(), re.sub(r"\{[^}]+\}", "1", path))
        for path, item in anonymous.get("/openapi.json").json()["paths"].items()
        for method in item
        if path.startswith("/api/")
    ]
    # The one deliberate exception: devices enrol with a one-time token and renew with their registered key,
    # never with an API token (controller/api/enrol.py). Nothing else may join them.
    open_to_devices = {("GET", "/api/v1/enrol/ca"), ("POST", "/api/v1/enrol"), ("POST", "/api/v1/enrol/renew")}
    assert open_to_devices <= set(operations)
    operations = [op for op in operations if op not in open_to_devices]
    assert len(operations) >= 15 and "POST" in {m for m, _ in operations}
    for method, path in operations:
        # A live stream (Server-Sent Events) runs for minutes; max_s=0 asks for its opening lines only.
        path = f"{path}?max_s=0" if path.endswith("/stream") else path
        # No route of any router is left out: without a token each answers 401 ...
        assert anonymous.request(method, path).status_code == 401, (method, path)
        # ... and a read-only token is refused exactly the routes that change something.
        code = reader.request(method, path, json={}).status_code
        assert (code == 403) == (method != "GET") and code != 401, (method, path, code)


# --- 4. /readyz: the status for anyone, the detail only with a token --------------------------------


def test_readyz_shows_its_checks_only_to_a_token(tmp_path: Path, store: Store) -> None:
    ingest = IngestStats(connected=True, stored=42, dead_lettered=3)
    api = make_api(tmp_path, store, ingest)
    anonymous = api.client()
    answer = anonymous.get("/readyz")
    assert answer.status_code == 200 and answer.json() == {"status": "ok"}
    assert api.client(WRONG).get("/readyz").json() == {"status": "ok"}
    detail = api.client(READ, address="198.51.100.1").get("/readyz").json()
    assert detail["status"] == "ok" and detail["checks"]["ingest_stored"] == 42
    assert detail["checks"]["database"] == "ok" and detail["checks"]["api_auth"]["failures"] == 1
    assert api.client(WRITE, address="198.51.100.1").get("/readyz").json()["checks"]["ingest_dead_lettered"] == 3

    ingest.connected = False
    down = anonymous.get("/readyz")
    assert down.status_code == 503 and down.json() == {"status": "unavailable"}
    assert api.client(READ, address="198.51.100.1").get("/readyz").json()["checks"]["broker"] == "disconnected"
    assert anonymous.get("/healthz").json()["status"] == "ok"


def test_readyz_never_refuses_and_a_locked_address_sees_only_the_status(api: Api) -> None:
    attacker = api.client(WRONG)
    for _ in range(10):
        assert attacker.get("/readyz").json() == {"status": "ok"}
    # Wrong tokens on /readyz count: it would otherwise tell right from wrong without limit.
    assert api.client(WRITE).get("/api/v1/events").status_code == 429
    answer = api.client(WRITE).get("/readyz")
    assert answer.status_code == 200 and answer.json() == {"status": "ok"}


def test_dev_on_loopback_without_tokens_shows_the_detail(tmp_path: Path, store: Store) -> None:
    api = make_api(tmp_path, store, IngestStats(connected=True), profile="dev", api_tokens=[], api_read_tokens=[])
    client = api.client(address="127.0.0.1")
    assert client.get("/readyz").json()["checks"]["broker"] == "connected"
    assert client.get("/api/v1/events").status_code == 200
    assert client.post("/api/v1/media/loans", json=_loan()).status_code == 201
    # The first console user closes the open dev mode: from then on everyone signs in.
    api.state.accounts.create_user(
        login="admin", display_name="管理 者", kana="かんり しゃ", role=Role.IT_ADMIN,
        password="correct horse battery", created_by="test",
    )  # fmt: skip
    assert client.get("/api/v1/events").status_code == 401
    assert "checks" not in client.get("/readyz").json()


# --- 5. database files 0600 in a 0700 folder --------------------------------------------------------


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_new_sqlite_database_is_private(tmp_path: Path) -> None:
    database = tmp_path / "new" / "deeper" / "controller.db"
    engine = make_engine(f"sqlite:///{database}")
    try:
        upgrade(engine)
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE probe (x INTEGER)"))
        with engine.connect() as conn:  # the WAL and its index exist while a connection is open
            assert {p.name for p in database.parent.iterdir()} >= {
                "controller.db",
                "controller.db-wal",
                "controller.db-shm",
            }
            for suffix in ("", "-wal", "-shm"):
                assert _mode(database.with_name(database.name + suffix)) == 0o600, suffix
            assert conn is not None
    finally:
        engine.dispose()
    assert _mode(database.parent) == 0o700


def test_open_store_tightens_an_earlier_start(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    var_dir = tmp_path / "var"
    config = _config(tmp_path, var_dir=var_dir)
    (tmp_path / "signing.key").write_bytes(signing.private_key_pem(signing.generate_key()))
    open_store(config).engine.dispose()
    var_dir.chmod(0o755)
    database = var_dir / "controller.db"
    for suffix in ("", "-wal", "-shm"):
        path = database.with_name(database.name + suffix)
        path.touch()
        path.chmod(0o644)
    caplog.set_level(logging.WARNING, logger="sekisho.controller.store.db")
    store = open_store(config)
    try:
        assert _mode(var_dir) == 0o700
        assert [_mode(database.with_name(database.name + s)) for s in ("", "-wal", "-shm")] == [0o600] * 3
    finally:
        store.engine.dispose()
    tightened = [r.getMessage() for r in caplog.records if r.getMessage().startswith("tightened")]
    assert len(tightened) == 4 and any("0o755 to 0o700" in m for m in tightened)


def test_making_an_engine_beside_a_live_connection_keeps_its_locks(tmp_path: Path) -> None:
    # Closing any descriptor of a file drops every POSIX lock the process holds on it: an engine made on a
    # database that a connection of this process has locked must not open the file, or another process
    # could write under that connection and corrupt the database.
    import sqlite3

    from sekisho.controller.store.db import make_engine

    database = tmp_path / "var" / "controller.db"
    make_engine(f"sqlite:///{database}").dispose()
    holder = sqlite3.connect(database, isolation_level=None)
    try:
        holder.execute("CREATE TABLE t (x)")
        holder.execute("BEGIN IMMEDIATE")  # a RESERVED lock on the database file itself (rollback journal)
        make_engine(f"sqlite:///{database}").dispose()
        other = subprocess.run(
            [sys.executable, "-c", "import sqlite3, sys; c = sqlite3.connect(sys.argv[1], timeout=0, "
             "isolation_level=None); c.execute('BEGIN IMMEDIATE')", str(database)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert other.returncode != 0 and "database is locked" in other.stderr
    finally:
        holder.close()


# --- the real `sekisho controller serve` ------------------------------------------------------------


def _http(url: str, token: str | None = None) -> tuple[int, dict[str, Any], Message]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read()), response.headers
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read()), err.headers


@pytest.mark.broker
def test_the_served_controller(pki: Path, tmp_path: Path) -> None:
    lab = lab_on(pki, tmp_path / "site")
    lab.start_broker()
    lab.write_controller_config(api_tokens=[WRITE], api_read_tokens=[READ], api_auth_failures=3)
    try:
        proc = lab.spawn_controller(http=True)
        base = f"http://127.0.0.1:{lab.http_port}"

        def ready() -> bool:
            assert proc.poll() is None, (lab.root / "logs" / "controller-1.log").read_text()
            try:
                return _http(f"{base}/readyz")[1] == {"status": "ok"}
            except OSError:
                return False

        wait_for(ready, 30, "the controller to be ready")
        assert _http(f"{base}/readyz", READ)[1]["checks"]["broker"] == "connected"
        var_dir = lab.root / "controller"
        assert _mode(var_dir) == 0o700
        for name in ("controller.db", "controller.db-wal", "controller.db-shm"):
            assert _mode(var_dir / name) == 0o600, name
        assert [_http(f"{base}/api/v1/events", WRONG)[0] for _ in range(4)] == [401, 401, 401, 429]
        code, _, headers = _http(f"{base}/api/v1/events", WRITE)
        assert code == 429 and int(headers.get("Retry-After", "0")) > 0
        log = (lab.root / "logs" / "controller-1.log").read_text()
        assert "authentication failed from 127.0.0.1" in log and WRONG not in log and WRITE not in log
    finally:
        lab.stop_all()
