"""Shared fixtures for the store tests: the same tests run on SQLite and on a fresh PostgreSQL database.

Registered for every test module by tests/conftest.py (pytest_plugins).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sekisho.controller.store import Store, make_engine, upgrade
from sekisho.lab import write_toml
from sekisho.lab.pgcluster import find_pg_bin, pg_database, postgres_cluster
from sekisho.protocol import signing
from sekisho.protocol.events import DecodedEvent, build_event, decode_event


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """Start one private PostgreSQL cluster for the session (never the machine's own server)."""
    if find_pg_bin() is None:
        pytest.skip("PostgreSQL binaries not installed (./dev.sh test installs them)")
    with postgres_cluster() as base:
        yield base


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Yield the URL of an empty, migrated database on each backend."""
    backend = request.param
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'var' / 'controller.db'}"
        upgrade(url)
        yield url
        return
    with pg_database(request.getfixturevalue("pg_server")) as url:
        upgrade(url)
        yield url


@pytest.fixture
def controller_key() -> Ed25519PrivateKey:
    """Return the test controller's signing key (it signs the store's checkpoints and key lines)."""
    return signing.generate_key()


@pytest.fixture
def controller_toml(tmp_path: Path, db_url: str, controller_key: Ed25519PrivateKey) -> Path:
    """Write a controller.toml on the test's database with the key the test store signs with."""
    key_path = tmp_path / "pki" / "signing.key"
    key_path.parent.mkdir()
    key_path.write_bytes(signing.private_key_pem(controller_key))
    key_path.chmod(0o600)
    values: dict[str, object] = {
        "profile": "dev",
        "var_dir": str(tmp_path / "var"),
        "database_url": db_url,
        "ca_cert": str(tmp_path / "pki" / "unused-ca.crt"),
        "tls_cert": str(tmp_path / "pki" / "unused.crt"),
        "tls_key": str(tmp_path / "pki" / "unused.key"),
        "signing_key": str(key_path),
    }
    return write_toml(tmp_path / "controller.toml", values)


@pytest.fixture
def store(db_url: str, controller_key: Ed25519PrivateKey) -> Iterator[Store]:
    """Yield a Store on a fresh database of each backend, opened with the controller's signing key."""
    engine = make_engine(db_url)
    try:
        yield Store(engine, signing_key=controller_key)
    finally:
        engine.dispose()


@dataclass
class FakeAgent:
    """A test agent with a real Ed25519 key that signs real wire events."""

    agent_id: str
    key: Ed25519PrivateKey = field(default_factory=signing.generate_key)

    @property
    def pem(self) -> str:
        """Return the public key as PEM text, as the store keeps it."""
        return signing.public_key_pem(self.key.public_key()).decode()

    def event(self, seq: int, **overrides: Any) -> DecodedEvent:
        """Build, sign and decode one synthetic event with this sequence number."""
        fields: dict[str, Any] = {"type": "test.synthetic", "payload": {"n": seq}}
        fields.update(overrides)
        raw = build_event(self.key, agent=self.agent_id, seq=seq, **fields)
        return decode_event(raw)

    def events(self, seqs: list[int] | range) -> list[DecodedEvent]:
        """Build one event per sequence number, in the given order."""
        return [self.event(seq) for seq in seqs]


class MakeAgent(Protocol):
    """Signature of the make_agent fixture."""

    def __call__(self, store: Store | None = None, prefix: str = "term", *, agent_id: str | None = None) -> FakeAgent:
        """Create a test agent, registered with the store if one is given."""
        ...


def _make_agent(store: Store | None = None, prefix: str = "term", *, agent_id: str | None = None) -> FakeAgent:
    agent = FakeAgent(agent_id or f"{prefix}-{uuid.uuid4().hex[:10]}")
    if store is not None:
        store.register_agent(agent.agent_id, agent.pem)
    return agent


@pytest.fixture
def make_agent() -> MakeAgent:
    """Return a factory of test agents with real keys (unique ids unless one is given)."""
    return _make_agent
