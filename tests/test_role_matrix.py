"""The role matrix decides every route (issue 12): generated from the app's own routes × every role.

A route without ``require(…)`` that is not in PUBLIC_ROUTES fails here; each role is sent to every route
with a token of its own user (and the legacy shared tokens as their service roles), and the answer must be
403 exactly when the matrix says no. The auditor is never let through a write.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from accounts_fixtures import READ, WRITE, Site, make_site
from fastapi import APIRouter, FastAPI
from fastapi.testclient import TestClient

from sekisho.controller.accounts.roles import (
    KIND,
    MATRIX,
    PUBLIC_ROUTES,
    WRITE_PERMISSIONS,
    Operation,
    Permission,
    Role,
    all_routes_have_a_rule,
    operations,
    require,
    routes_without_a_rule,
)
from sekisho.controller.api.app import create_app
from sekisho.controller.store import Store, make_engine, upgrade

SAFE = {"GET", "HEAD", "OPTIONS"}


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    tmp_path = tmp_path_factory.mktemp("matrix")
    engine = make_engine(f"sqlite:///{tmp_path / 'controller.db'}")
    upgrade(engine)
    yield make_site(tmp_path, Store(engine))
    engine.dispose()


@pytest.fixture(scope="module")
def tokens(site: Site) -> dict[Role, str]:
    """Return an API token of a user of every role (an area manager of area "1", the id the paths use)."""
    return {role: site.accounts.create_token(site.user(role), "matrix", None, by="test").token for role in Role}


def _guarded(app: FastAPI) -> list[Operation]:
    return [op for op in operations(app) if op.permission is not None and op.method != "HEAD"]


def test_every_route_has_a_rule(site: Site) -> None:
    app = create_app(site.state)
    assert routes_without_a_rule(app) == [] and all_routes_have_a_rule(app)
    assert len(_guarded(app)) >= 25
    # Public routes are only the ones listed, and each listed one exists (no stale entries).
    served = {(op.method, op.path) for op in operations(app)}
    assert served >= PUBLIC_ROUTES, PUBLIC_ROUTES - served


def test_a_new_route_without_a_rule_is_named(site: Site) -> None:
    app = create_app(site.state)
    extra = APIRouter(prefix="/api/v1/new")

    @extra.post("/thing")
    def thing() -> dict[str, str]:
        return {}

    @extra.get("/ruled", dependencies=[require(Permission.RECORDS_READ)])
    def ruled() -> dict[str, str]:
        return {}

    app.include_router(extra)
    assert routes_without_a_rule(app) == ["POST /api/v1/new/thing"]
    assert not all_routes_have_a_rule(app)


def test_the_auditor_holds_no_write_and_every_permission_has_a_kind() -> None:
    assert set(MATRIX) == set(Permission) == set(KIND)
    assert WRITE_PERMISSIONS and not any(Role.AUDITOR in MATRIX[p] for p in WRITE_PERMISSIONS)
    assert all(MATRIX[p] for p in Permission)  # nobody-may permissions would be dead routes


def _path(template: str) -> str:
    # Path parameters: "1" fits every id pattern, and the area manager's area is "1".
    path = re.sub(r"\{[^}]+\}", "1", template)
    # A live stream (Server-Sent Events) runs for minutes; max_s=0 asks for its opening lines only.
    return f"{path}?max_s=0" if path.endswith("/stream") else path


def test_every_route_for_every_role(site: Site, tokens: dict[Role, str]) -> None:
    app = create_app(site.state)
    clients = {role: TestClient(app, base_url="https://testserver", headers={"Authorization": f"Bearer {t}"},
                                follow_redirects=False) for role, t in tokens.items()}  # fmt: skip
    checked = 0
    for op in _guarded(app):
        assert op.permission is not None
        for role, client in clients.items():
            answer = client.request(op.method, _path(op.path), json={})
            allowed = role in MATRIX[op.permission]
            assert answer.status_code != 401, (role, op, answer.text)
            if allowed:
                assert answer.status_code != 403, (role, op, answer.text)
            else:
                assert answer.status_code == 403, (role, op, answer.status_code)
            if role == Role.AUDITOR and op.method not in SAFE and KIND[op.permission] != "self":
                assert answer.status_code == 403, (op, "the auditor was let through a write")
            checked += 1
    assert checked >= 25 * len(Role)


@pytest.mark.parametrize(("token", "role"), [(READ, Role.AUDITOR), (WRITE, Role.IT_ADMIN)])
def test_legacy_shared_tokens_act_as_their_service_role(site: Site, token: str, role: Role) -> None:
    app = create_app(site.state)
    client = TestClient(app, base_url="https://testserver", headers={"Authorization": f"Bearer {token}"},
                        follow_redirects=False)  # fmt: skip
    for op in _guarded(app):
        assert op.permission is not None
        if not op.path.startswith("/api/"):
            continue
        code = client.request(op.method, _path(op.path), json={}).status_code
        assert (code == 403) == (role not in MATRIX[op.permission]), (op, code)


def test_without_credentials_every_guarded_route_is_refused(site: Site, tmp_path: Path) -> None:
    app = create_app(site.state)
    anonymous = TestClient(app, base_url="https://testserver", follow_redirects=False)
    for op in _guarded(app):
        code = anonymous.request(op.method, _path(op.path), json={}).status_code
        # The API says 401; console pages send a browser to the sign-in page.
        assert code in (401, 303) if op.path.startswith("/console") else code == 401, (op, code)
