"""Console accounts (issue 12, item 1): argon2id passwords, sign-in with lock-out, TOTP for admin roles,
sessions (cookie flags, idle and absolute expiry, CSRF, password change), per-user API tokens, the CLI.

Everything runs through the real app (FastAPI TestClient) on a real store, with real argon2 and pyotp;
the account service tests run on SQLite and PostgreSQL (store fixture). Time is a controlled clock.
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pyotp
import pytest
from accounts_fixtures import PASSWORD, READ, Clock, Site, make_site
from argon2 import PasswordHasher
from fastapi.testclient import TestClient
from sqlalchemy import select, update
from typer.testing import CliRunner, Result

from sekisho import cli
from sekisho.controller.accounts.passwords import PasswordRejected
from sekisho.controller.accounts.roles import Role
from sekisho.controller.accounts.service import AccountError, AccountService, AccountSettings, LoginRefused
from sekisho.controller.store import Store, make_engine, upgrade
from sekisho.controller.store.models import AdminAuditEntry, ConsoleApiToken, ConsoleUser, LoginAttempt
from sekisho.lab import write_toml


@pytest.fixture
def site(tmp_path: Path) -> Site:
    engine = make_engine(f"sqlite:///{tmp_path / 'controller.db'}")
    upgrade(engine)
    return make_site(tmp_path, Store(engine))


def _accounts(store: Store, clock: Clock, **settings: object) -> AccountService:
    return AccountService(store, AccountSettings(**settings), clock=clock)  # type: ignore[arg-type]


def _signed_in(client: TestClient) -> bool:
    return client.get("/console/session").status_code == 200


def _outcomes(store: Store, login: str) -> list[str]:
    rows = store.read(select(LoginAttempt).where(LoginAttempt.login == login).order_by(LoginAttempt.id))
    return [r.outcome for r in rows]


# --- passwords --------------------------------------------------------------------------------------


def test_passwords_are_argon2id_hashes_and_the_policy_holds(store: Store) -> None:
    accounts = _accounts(store, Clock())
    user = accounts.create_user(
        login="Yamada", display_name="山田 太郎", kana="やまだ たろう", role=Role.FACILITY_MANAGER,
        password=PASSWORD, created_by="test",
    )  # fmt: skip
    assert user.login == "yamada" and user.display_name == "山田 太郎" and user.kana == "やまだ たろう"
    assert user.password_hash.startswith("$argon2id$") and PASSWORD not in user.password_hash
    with pytest.raises(PasswordRejected, match="12"):
        accounts.create_user(login="sato", display_name="佐藤", kana="さとう", role=Role.AUDITOR,
                             password="short-pw", created_by="test")  # fmt: skip
    with pytest.raises(PasswordRejected, match="ログインIDと同じ"):  # the process language (tests: ja)
        accounts.create_user(login="suzuki-hanako", display_name="鈴木", kana="すずき", role=Role.AUDITOR,
                             password="Suzuki-Hanako", created_by="test")  # fmt: skip
    with pytest.raises(AccountError, match="ログインID yamada は使用中です"):
        accounts.create_user(login="YAMADA", display_name="別人", kana="べつじん", role=Role.AUDITOR,
                             password=PASSWORD, created_by="test")  # fmt: skip
    with pytest.raises(AccountError, match="区域責任者には --area が必要です"):
        accounts.create_user(login="kuiki", display_name="区域", kana="くいき", role=Role.AREA_MANAGER,
                             password=PASSWORD, created_by="test")  # fmt: skip
    with pytest.raises(AccountError, match="マイナンバー"):
        accounts.create_user(login="mn", display_name="123456789018", kana="まいなんばー", role=Role.AUDITOR,
                             password=PASSWORD, created_by="test")  # fmt: skip
    # A hash made with weaker parameters is replaced at the next sign-in.
    weak = PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1).hash(PASSWORD)
    store.write(
        lambda conn: conn.execute(update(ConsoleUser).where(ConsoleUser.id == user.id).values(password_hash=weak))
    )
    accounts.login("yamada", PASSWORD, None, "192.0.2.1")
    renewed = accounts.user("yamada").password_hash
    assert renewed != weak and renewed.startswith("$argon2id$") and "m=65536" in renewed


# --- sign-in, throttling and lock-out ---------------------------------------------------------------


def test_sign_in_wrong_password_and_lockout_are_recorded(store: Store) -> None:
    clock = Clock()
    accounts = _accounts(store, clock, login_failures=3, login_lockout=timedelta(minutes=15))
    accounts.create_user(login="tanaka", display_name="田中 一郎", kana="たなか いちろう",
                         role=Role.FACILITY_MANAGER, password=PASSWORD, created_by="test")  # fmt: skip
    signed = accounts.login("tanaka", PASSWORD, None, "192.0.2.1")
    assert signed.user.login == "tanaka" and len(signed.session_id) >= 43
    for _ in range(3):
        with pytest.raises(LoginRefused) as refused:
            accounts.login("tanaka", "wrong password!", None, "192.0.2.1")
        assert refused.value.reason == "bad_password"
    assert "ロックしました（15分）" in refused.value.message  # the process language (tests: ja)
    assert refused.value.message.text("en").endswith("— locked for 15 min")
    # Locked: the right password is not even checked, from any address.
    with pytest.raises(LoginRefused) as locked:
        accounts.login("tanaka", PASSWORD, None, "198.51.100.9")
    assert locked.value.reason == "locked" and 0 < (locked.value.retry_after or 0) <= 15 * 60
    assert _outcomes(store, "tanaka") == ["ok", "bad_password", "bad_password", "bad_password", "locked_out",
                                          "refused_locked"]  # fmt: skip
    # The lock-out ends after its time; the count starts again.
    clock.advance(minutes=15, seconds=1)
    assert accounts.login("tanaka", PASSWORD, None, "192.0.2.1").user.login == "tanaka"
    # An unknown login is throttled the same way (nothing tells it apart from a wrong password).
    for _ in range(3):
        with pytest.raises(LoginRefused) as unknown:
            accounts.login("nobody", PASSWORD, None, "192.0.2.1")
    assert unknown.value.message.startswith("ログインID、パスワード")
    assert _outcomes(store, "nobody")[-1] == "locked_out"
    # Audit trail: failures and the lock-out are admin audit rows too.
    actions = [r.action for r in store.read(select(AdminAuditEntry).order_by(AdminAuditEntry.id))]
    assert "login.locked_out" in actions and "login.bad_password" in actions and "user.create" in actions


def test_one_address_trying_many_logins_is_locked_out(store: Store) -> None:
    accounts = _accounts(store, Clock(), login_failures=100, login_client_failures=5)
    accounts.create_user(login="kato", display_name="加藤", kana="かとう", role=Role.AUDITOR, password=PASSWORD,
                         created_by="test")  # fmt: skip
    for n in range(5):
        with pytest.raises(LoginRefused):
            accounts.login(f"guess{n}", PASSWORD, None, "2001:db8:1:2::1")
    with pytest.raises(LoginRefused) as refused:
        accounts.login("kato", PASSWORD, None, "2001:db8:1:2::99")  # same /64
    assert refused.value.reason == "locked"
    assert accounts.login("kato", PASSWORD, None, "2001:db8:9::1").user.login == "kato"
    assert "client_locked_out" in [a.outcome for a in accounts.attempts()]


def test_login_form_throttles_and_says_so(site: Site) -> None:
    login = site.user(Role.AUDITOR)
    client = site.client()
    codes = [site.sign_in(client, login, "not the password").status_code for _ in range(5)]
    assert codes == [401] * 5
    locked = site.sign_in(client, login)
    assert locked.status_code == 429 and int(locked.headers["Retry-After"]) > 0
    assert "ロック" in locked.text and "sekisho_session" not in client.cookies


# --- TOTP for the admin roles -----------------------------------------------------------------------


def test_admin_roles_need_totp_and_a_code_works_once(site: Site) -> None:
    site.accounts.create_user(login="admin", display_name="情報 太郎", kana="じょうほう たろう", role=Role.IT_ADMIN,
                              password=PASSWORD, created_by="test")  # fmt: skip
    client = site.client()
    refused = site.sign_in(client, "admin")
    assert refused.status_code == 401 and "sekisho users totp-enrol --login admin" in refused.text
    secret, uri = site.accounts.enrol_totp("admin", by="test")
    assert uri.startswith("otpauth://totp/") and secret in uri and "issuer=sekisho" in uri
    site.totp_secrets["admin"] = secret
    assert site.sign_in(client, "admin", totp="").status_code == 401  # code missing: a failure
    assert site.sign_in(client, "admin", totp="000000").status_code in (401,)  # wrong code
    code = pyotp.TOTP(secret).at(site.clock())
    assert site.sign_in(client, "admin", totp=code).status_code == 303
    # The same code again (seen over a shoulder) is refused; the next step's code works.
    assert site.sign_in(site.client(), "admin", totp=code).status_code == 401
    site.clock.advance(seconds=30)
    assert site.sign_in(site.client(), "admin").status_code == 303
    outcomes = _outcomes(site.state.store, "admin")
    assert outcomes[:4] == ["totp_not_enrolled", "totp_missing", "bad_totp", "ok"] and outcomes[4] == "bad_totp"
    # A role without the requirement signs in with its password alone.
    assert site.sign_in(site.client(), site.user(Role.FACILITY_MANAGER)).status_code == 303


# --- sessions -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("profile", ["production", "dev"])
def test_session_cookie_flags(tmp_path: Path, profile: str) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'controller.db'}")
    upgrade(engine)
    site = make_site(tmp_path, Store(engine), profile=profile)
    answer = site.sign_in(site.client(), site.user(Role.AUDITOR))
    assert answer.status_code == 303 and answer.headers["location"] == "/console/"
    cookie = next(h for h in answer.headers.get_list("set-cookie") if h.startswith("sekisho_session="))
    flags = {part.strip().lower() for part in cookie.split(";")[1:]}
    assert {"httponly", "samesite=lax", "path=/"} <= flags
    assert ("secure" in flags) == (profile == "production")
    # Only the SHA-256 of the id is stored.
    session_id = cookie.split(";")[0].split("=", 1)[1]
    stored = [s.id_sha256 for s in site.accounts.sessions(site.accounts.user("auditor").id)]
    assert len(stored) == 1 and stored[0] != session_id and len(stored[0]) == 64


def test_sessions_expire_when_idle_and_at_their_absolute_end(site: Site) -> None:
    login = site.user(Role.AUDITOR)
    client = site.client()
    assert site.sign_in(client, login).status_code == 303
    assert _signed_in(client)
    site.clock.advance(minutes=29)
    assert _signed_in(client)  # activity keeps it alive
    site.clock.advance(minutes=31)
    idle = client.get("/console/session")
    # The console answers a signed-out page request with the sign-in page (a 401 elsewhere).
    assert idle.status_code in (303, 401) and not _signed_in(client)
    assert client.get("/api/v1/findings").json()["detail"].endswith("再度ログインしてください")
    english = client.get("/api/v1/findings", headers={"Accept-Language": "en"}).json()["detail"]
    assert english == "the session has ended; sign in again"
    # Busy all day: it still ends after 12 hours.
    assert site.sign_in(client, login).status_code == 303
    for _ in range(12 * 3):
        site.clock.advance(minutes=20)
        if not _signed_in(client):
            break
    assert not _signed_in(client)
    assert site.clock.now - site.accounts.attempts(login)[0].at >= timedelta(hours=12)


def test_csrf_is_required_on_state_changing_session_requests(site: Site) -> None:
    login = site.user(Role.FACILITY_MANAGER)
    client = site.client()
    assert site.sign_in(client, login).status_code == 303
    token = site.csrf(client)
    loan = {"medium": "m-0001", "person": "p-0001", "terminals": ["t-hr-01"],
            "ends_at": (site.clock() + timedelta(days=1)).isoformat(), "purpose": "test",
            "approved_by": "p-0002", "recorded_by": "p-0002"}  # fmt: skip
    missing = client.post("/api/v1/media/loans", json=loan)
    assert missing.status_code == 403 and "CSRF" in missing.json()["detail"]
    forged = client.post("/api/v1/media/loans", json=loan, headers={"X-CSRF-Token": token[:-2] + "xx"})
    assert forged.status_code == 403
    # Another session's token is no good either.
    other = site.client()
    site.sign_in(other, login)
    assert client.post("/console/logout", data={"csrf_token": site.csrf(other)}).status_code == 403
    assert client.post("/console/logout", data={}).status_code == 403
    assert _signed_in(client)  # still signed in
    # The right token, as a header or a form field.
    made = client.post("/api/v1/media/loans", json=loan, headers={"X-CSRF-Token": token})
    assert made.status_code == 201, made.text
    out = client.post("/console/logout", data={"csrf_token": token})
    assert out.status_code == 303 and out.headers["location"] == "/console/login"
    assert not _signed_in(client)
    # The sign-in form itself: without its pre-session token the POST is refused.
    bare = site.client().post("/console/login", data={"login": login, "password": PASSWORD, "csrf_token": "x"})
    assert bare.status_code == 403 and "sekisho_session" not in bare.headers.get("set-cookie", "")


def test_password_change_ends_the_other_sessions(site: Site) -> None:
    login = site.user(Role.AUDITOR)
    laptop, tablet = site.client(), site.client(address="192.0.2.20")
    assert site.sign_in(laptop, login).status_code == 303 and site.sign_in(tablet, login).status_code == 303
    token = site.csrf(laptop)
    form = {"current_password": "wrong wrong wrong", "new_password": "a new long passphrase",
            "new_password_again": "a new long passphrase", "csrf_token": token}  # fmt: skip
    assert laptop.post("/console/password", data=form).status_code == 422
    form["current_password"] = PASSWORD
    changed = laptop.post("/console/password", data=form)
    assert changed.status_code == 200 and "パスワードを変更しました" in changed.text
    assert _signed_in(laptop)
    assert not _signed_in(tablet)
    assert site.sign_in(site.client(), login).status_code == 401
    assert site.sign_in(site.client(), login, "a new long passphrase").status_code == 303


def test_an_open_redirect_after_sign_in_is_refused(site: Site) -> None:
    login = site.user(Role.AUDITOR)
    client = site.client()
    page = client.get("/console/login?next=//evil.example/")
    assert 'value="/console/"' in page.text
    import re

    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert token
    form = {"login": login, "password": PASSWORD, "csrf_token": token.group(1), "next": "https://evil.example/"}
    assert client.post("/console/login", data=form).headers["location"] == "/console/"


# --- API tokens per user -----------------------------------------------------------------------------


def test_api_tokens_act_with_their_users_role(site: Site) -> None:
    auditor, manager = site.user(Role.AUDITOR), site.user(Role.FACILITY_MANAGER)
    read = site.accounts.create_token(auditor, "dashboard", timedelta(days=90), by="test")
    lend = site.accounts.create_token(manager, "counter tablet", None, by="test")
    assert read.token.startswith("skt_") and read.expires_at == site.clock() + timedelta(days=90)
    stored = site.state.store.read(select(ConsoleApiToken).where(ConsoleApiToken.id == read.id))[0]
    assert stored.secret_sha256 != read.token and read.token not in str(stored.__dict__)
    with pytest.raises(AccountError, match="dashboard"):
        site.accounts.create_token(auditor, "dashboard", None, by="test")

    as_auditor = site.client(headers={"Authorization": f"Bearer {read.token}"})
    assert as_auditor.get("/api/v1/events").status_code == 200
    denied = as_auditor.post("/api/v1/media/loans/x/revoke", json={"reason": "x", "revoked_by": "p-0002"})
    assert denied.status_code == 403 and "media.lend" in denied.json()["detail"]
    as_manager = site.client(headers={"Authorization": f"Bearer {lend.token}"})
    assert as_manager.get("/api/v1/events").status_code == 403  # raw records: not a facility manager's
    assert as_manager.get("/api/v1/keys/loans").status_code == 200
    # Bearer requests need no CSRF token.
    assert (
        as_manager.post("/api/v1/media/loans/none/revoke", json={"reason": "x", "revoked_by": "p-0002"}).status_code
        == 404
    )

    # Last use is kept (with the address).
    site.clock.advance(minutes=5)
    as_auditor.get("/api/v1/agents")
    used = {t.id: t for t, _ in site.accounts.tokens(auditor)}[read.id]
    assert used.last_used_at == site.clock() and used.last_used_client == "192.0.2.10"

    # Revoked, expired, or a disabled user's: refused like a wrong token.
    site.accounts.revoke_token(read.id, by="test")
    assert as_auditor.get("/api/v1/events").status_code == 401
    with pytest.raises(AccountError):
        site.accounts.revoke_token(read.id, by="test")
    short = site.accounts.create_token(auditor, "short", timedelta(hours=1), by="test")
    site.clock.advance(hours=2)
    assert site.client(headers={"Authorization": f"Bearer {short.token}"}).get("/api/v1/events").status_code == 401
    site.accounts.set_disabled(manager, True, by="test")
    assert as_manager.get("/api/v1/keys/loans").status_code == 401


def test_legacy_shared_tokens_still_work_as_service_roles(site: Site) -> None:
    reader = site.client(headers={"Authorization": f"Bearer {READ}"})
    assert reader.get("/api/v1/events").status_code == 200
    assert reader.post("/api/v1/media/loans/x/revoke", json={"reason": "x", "revoked_by": "p"}).status_code == 403
    writer = site.client(headers={"Authorization": f"Bearer {'w' * 32}"})
    assert writer.get("/api/v1/fleet/revocations").status_code == 200
    assert (
        writer.post("/api/v1/media/loans/none/revoke", json={"reason": "x", "revoked_by": "p-0002"}).status_code == 404
    )


def test_area_managers_see_only_their_areas(site: Site) -> None:
    login = site.user(Role.AREA_MANAGER, "kuiki", areas=("server-room",))
    token = site.accounts.create_token(login, "t", None, by="test").token
    client = site.client(headers={"Authorization": f"Bearer {token}"})
    assert client.get("/api/v1/areas/server-room/presence").status_code == 200
    assert client.get("/api/v1/areas/hr-office/presence").status_code == 403
    assert client.get("/api/v1/visits").status_code == 200  # their one area by default
    assert client.get("/api/v1/visits?area=hr-office").status_code == 403
    assert client.get("/api/v1/keys/loans").status_code == 403


# --- the CLI ------------------------------------------------------------------------------------------


def test_users_cli(tmp_path: Path) -> None:
    config = write_toml(
        tmp_path / "controller.toml",
        {"profile": "dev", "var_dir": str(tmp_path / "var"), "ca_cert": "ca.pem", "tls_cert": "c.pem",
         "tls_key": "c.key", "signing_key": "signing.key"},
    )  # fmt: skip

    # The first admin through the installed entry point; the rest in-process (same commands, faster).
    made = subprocess.run(
        [sys.executable, "-m", "sekisho", "users", "create", "--role", "it-admin", "--login", "admin", "--name",
         "山田 太郎", "--kana", "やまだ たろう", "--password-stdin", "--config", str(config)],
        input=PASSWORD + "\n", capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    assert "totp-enrol" in made.stdout
    runner = CliRunner()

    def run(*args: str, stdin: str | None = None) -> Result:
        result = runner.invoke(cli.app, ["users", *args, "--config", str(config)], input=stdin,
                               env={"COLUMNS": "200"})  # fmt: skip
        return result

    short = run("create", "--role", "auditor", "--login", "kansa", "--name", "監査 花子", "--kana", "かんさ はなこ",
                "--password-stdin", stdin="short\n")  # fmt: skip
    assert short.exit_code == 2 and "12" in short.stderr
    bad_role = run("create", "--role", "root", "--login", "x", "--name", "x", "--kana", "x", "--password-stdin",
                   stdin=PASSWORD)  # fmt: skip
    assert bad_role.exit_code == 2 and "役割が不明です" in bad_role.stderr
    listed = run("list")
    assert "admin" in listed.stdout and "山田 太郎" in listed.stdout and "it_admin" in listed.stdout
    enrolled = run("totp-enrol", "--login", "admin")
    assert enrolled.exit_code == 0 and "otpauth://totp/" in enrolled.stdout
    issued = run("token", "create", "--login", "admin", "--name", "prometheus", "--expires", "30d")
    assert issued.exit_code == 0, issued.stderr
    token = issued.stdout.strip().splitlines()[-1]
    assert token.startswith("skt_")
    tokens = run("token", "list")
    assert "prometheus" in tokens.stdout and token not in tokens.stdout
    token_id = token.split("_")[1]
    assert run("token", "revoke", token_id).exit_code == 0
    assert "失効" in run("token", "list").stdout  # Japanese: tests/conftest.py pins the language
    assert run("set-role", "--login", "admin", "--role", "auditor").exit_code == 0
    assert run("disable", "--login", "admin").exit_code == 0
    assert "無効" in run("list").stdout
