"""Helpers for the console account tests: a controlled clock, a real app on a real store, users per role.

Used by tests/test_accounts.py and tests/test_role_matrix.py (imported, not a pytest plugin).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyotp
from fastapi.testclient import TestClient
from pydantic import SecretStr
from test_media import site_yaml

from sekisho.controller.accounts.roles import ADMIN_ROLES, Role
from sekisho.controller.accounts.service import AccountService
from sekisho.controller.api.app import create_app
from sekisho.controller.api.deps import AppState
from sekisho.controller.config import ControllerConfig
from sekisho.controller.policy.loader import parse_policy
from sekisho.controller.policy.service import PolicyService
from sekisho.controller.store import Store
from sekisho.protocol import signing

PASSWORD = "correct horse battery staple"
WRITE = "w" * 32
READ = "r" * 32


class Clock:
    """A wall clock the test moves by hand (sessions, lock-outs and TOTP steps without sleeping)."""

    def __init__(self) -> None:
        self.now = datetime(2026, 12, 7, 1, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        """Move the clock forward."""
        self.now += timedelta(**delta)


@dataclass
class Site:
    """A controller app on a real store, with its accounts and clock."""

    state: AppState
    clock: Clock
    totp_secrets: dict[str, str] = field(default_factory=dict)

    @property
    def accounts(self) -> AccountService:
        return self.state.accounts

    def client(self, address: str = "192.0.2.10", **kwargs: Any) -> TestClient:
        """Return a client of a fresh app over the same state (its own cookie jar)."""
        # https: outside the dev profile the cookies are Secure, so a browser sends them over HTTPS only.
        return TestClient(
            create_app(self.state), base_url="https://testserver", client=(address, 50000), follow_redirects=False,
            **kwargs,
        )  # fmt: skip

    def user(self, role: Role, login: str | None = None, areas: tuple[str, ...] = ()) -> str:
        """Create a user of the role (with TOTP for admin roles, an area for an area manager); return its login."""
        login = login or role.value.replace("_", "-")
        if role == Role.AREA_MANAGER and not areas:
            areas = ("1",)
        self.accounts.create_user(
            login=login, display_name="試験 太郎", kana="しけん たろう", role=role, password=PASSWORD,
            areas=areas, created_by="test",
        )  # fmt: skip
        if role in ADMIN_ROLES:
            self.totp_secrets[login], _ = self.accounts.enrol_totp(login, by="test")
        return login

    def code(self, login: str) -> str:
        """Return the current TOTP code of a user (as their authenticator app would show it)."""
        return pyotp.TOTP(self.totp_secrets[login]).at(self.clock())

    def sign_in(self, client: TestClient, login: str, password: str = PASSWORD, totp: str | None = None) -> Any:
        """Sign in through the real form: GET the page (pre-session CSRF cookie), POST the form."""
        page = client.get("/console/login")
        match = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
        assert match, page.text
        if totp is None and login in self.totp_secrets:
            totp = self.code(login)
        form = {"login": login, "password": password, "csrf_token": match.group(1), "totp": totp or ""}
        return client.post("/console/login", data=form)

    def csrf(self, client: TestClient) -> str:
        """Return the CSRF token of the client's session."""
        answer = client.get("/console/session")
        assert answer.status_code == 200, answer.text
        token: str = answer.json()["csrf_token"]
        return token


def make_site(tmp_path: Path, store: Store, **overrides: Any) -> Site:
    """Return a production controller app on the store, with the demo policy and a readable signing key."""
    key = signing.generate_key()
    (tmp_path / "signing.key").write_bytes(signing.private_key_pem(key))
    PolicyService(store, key).apply(parse_policy(site_yaml()), source_sha256="0" * 64, created_by="test")
    values: dict[str, Any] = {
        "profile": "production",
        "var_dir": tmp_path,
        "ca_cert": tmp_path / "ca.pem",
        "tls_cert": tmp_path / "c.pem",
        "tls_key": tmp_path / "c.key",
        "signing_key": tmp_path / "signing.key",
        "api_tokens": [SecretStr(WRITE)],
        "api_read_tokens": [SecretStr(READ)],
        "api_auth_failures": 1000,
    }
    values.update(overrides)
    clock = Clock()
    state = AppState(ControllerConfig(**values), store, None, clock=clock)
    return Site(state, clock)
