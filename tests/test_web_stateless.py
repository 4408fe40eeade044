"""Web processes are stateless: a request may land on any of them (several `serve` behind one balancer).

Two apps, each with its own AppState, its own engine and its own in-memory parts (as two processes have),
over one database (SQLite, and the tests' private PostgreSQL): a session made on one works on the other,
its CSRF token too, a sign-out on one ends it on both, failed sign-ins counted on both lock the login, and a
user's API token works on either.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from accounts_fixtures import PASSWORD, Site, make_site
from fastapi.testclient import TestClient

from sekisho.controller.accounts.roles import Role
from sekisho.controller.api.deps import AppState
from sekisho.controller.store import Store, make_engine


@pytest.fixture
def two(tmp_path: Path, store: Store, db_url: str) -> Iterator[tuple[Site, Site]]:
    """Two web processes' worth of state on one database (the second with its own engine and store)."""
    first = make_site(tmp_path, store)
    engine = make_engine(db_url)
    try:
        other = AppState(first.state.config, Store(engine, signing_key=store.signing_key), None, clock=first.clock)
        yield first, Site(other, first.clock, first.totp_secrets)
    finally:
        engine.dispose()


def carry(cookies_from: TestClient, to: TestClient) -> None:
    """Send the browser's cookies to the other process (what a balancer without affinity does)."""
    for cookie in cookies_from.cookies.jar:
        to.cookies.set(cookie.name, cookie.value or "")


def test_a_session_made_on_one_process_works_on_the_other_and_ends_on_both(two: tuple[Site, Site]) -> None:
    a, b = two
    login = a.user(Role.FACILITY_MANAGER)
    on_a = a.client()
    assert a.sign_in(on_a, login).status_code == 303
    on_b = b.client()
    carry(on_a, on_b)
    answer = on_b.get("/console/session")
    assert answer.status_code == 200, answer.text
    assert answer.json()["login"] == login
    # The CSRF token the first process gave is good on the second: it derives from the session, not memory.
    token = a.csrf(on_a)
    assert b.csrf(on_b) == token
    assert on_b.post("/console/logout", data={"csrf_token": token[:-2] + "xx"}).status_code == 403
    out = on_b.post("/console/logout", data={"csrf_token": token})
    assert out.status_code == 303
    # Signed out on the second process: the first no longer knows the session either.
    gone = on_a.get("/console/session")
    assert gone.status_code == 303 and gone.headers["location"].startswith("/console/login")


def test_failed_sign_ins_on_two_processes_add_up_to_one_lockout(two: tuple[Site, Site]) -> None:
    a, b = two
    login = a.user(Role.AUDITOR)
    clients = [a.client(), b.client()]
    sites = [a, b]
    # Five failures (login_failures) spread over both processes, as a balancer would spread them.
    codes = [sites[i % 2].sign_in(clients[i % 2], login, "not the password").status_code for i in range(5)]
    assert codes == [401] * 5
    for site, client in zip(sites, clients, strict=True):
        locked = site.sign_in(client, login, PASSWORD)
        assert locked.status_code == 429, "a process did not see the failures counted on the other"


def test_an_api_token_issued_anywhere_works_on_every_process(two: tuple[Site, Site]) -> None:
    a, b = two
    login = a.user(Role.AUDITOR)
    issued = a.accounts.create_token(login, "siem", None, by="test")
    token = issued.token
    for site in (a, b):
        answer = site.client().get("/api/v1/findings", headers={"Authorization": f"Bearer {token}"})
        assert answer.status_code == 200, answer.text
    b.accounts.revoke_token(issued.id, by="test")
    answer = a.client().get("/api/v1/findings", headers={"Authorization": f"Bearer {token}"})
    assert answer.status_code == 401
