"""The console's shell (issue 12, item 7): JST formats, the ja/en catalogue, layout, language switch, security
headers, error pages, htmx present or absent, and the set-up script that fetches htmx against its pin.

Against the real app (create_app, real accounts with argon2 passwords and sessions) through TestClient; the
asset script against tarballs built here (no network).
"""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from sekisho.controller.accounts.roles import Role
from sekisho.controller.accounts.web import accounts_router
from sekisho.controller.api.app import create_app
from sekisho.controller.api.deps import AppState
from sekisho.controller.config import ControllerConfig
from sekisho.controller.console import formats, i18n, templating, web
from sekisho.controller.store import Store, make_engine, upgrade

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "requirements" / "assets.py"
PASSWORD = "correct horse battery staple 7"


# --- formats ---------------------------------------------------------------------------------------------


def test_jst_shows_utc_in_japan_time_with_the_japanese_weekday() -> None:
    # 14:59 UTC on Saturday is still Saturday 23:59 in Japan; 15:00 UTC is already Sunday.
    assert formats.jst(datetime(2026, 12, 5, 14, 59, tzinfo=UTC)) == "2026/12/05 (土) 23:59"
    assert formats.jst(datetime(2026, 12, 5, 15, 0, tzinfo=UTC)) == "2026/12/06 (日) 00:00"
    assert formats.jst(datetime(2026, 12, 6, 5, 5, tzinfo=UTC)) == "2026/12/06 (日) 14:05"
    assert formats.jst(datetime(2026, 12, 6, 5, 5, 9, tzinfo=UTC), seconds=True) == "2026/12/06 (日) 14:05:09"
    assert formats.jst(datetime(2026, 12, 6, 5, 5, tzinfo=UTC), "en") == "Sun 6 Dec 2026 14:05"
    # Any offset in, JST out.
    assert formats.jst(datetime(2026, 12, 6, 0, 5, tzinfo=timezone(timedelta(hours=-5)))) == "2026/12/06 (日) 14:05"
    assert formats.jst(None) == ""


def test_jst_date_iso_and_today_follow_the_japanese_calendar_day() -> None:
    late = datetime(2026, 12, 31, 15, 30, tzinfo=UTC)  # New Year's Day in Japan
    assert formats.jst_date(late) == "2027/01/01 (金)"
    assert formats.jst_date(late, "en") == "Fri 1 Jan 2027"
    assert formats.jst_date(date(2026, 12, 7)) == "2026/12/07 (月)"
    assert formats.jst_today(late) == date(2027, 1, 1)
    assert formats.iso_jst(late) == "2027-01-01T00:30:00+09:00"
    assert formats.jst_time(late) == "00:30"
    assert formats.utc(datetime(2027, 1, 1, 0, 30, tzinfo=formats.JST)) == late


def test_a_naive_datetime_is_refused_rather_than_shifted() -> None:
    with pytest.raises(ValueError, match="naive"):
        formats.jst(datetime(2026, 12, 6, 5, 5))


def test_people_show_kanji_with_kana_ruby_and_the_id_only_on_hover_escaped() -> None:
    shown = str(formats.person("山田 太郎", "やまだ たろう", 42))
    assert "<ruby>山田 太郎<rp>（</rp><rt>やまだ たろう</rt><rp>）</rp></ruby>" in shown
    assert 'title="ID: 42"' in shown and ">42<" not in shown
    hostile = str(formats.person("<script>alert(1)</script>", '"><b>', '" onmouseover="x'))
    assert "<script>" not in hostile and "<b>" not in hostile and '" onmouseover' not in hostile
    assert formats.person_text("山田 太郎", "やまだ たろう") == "山田 太郎（やまだ たろう）"
    assert formats.person_text("Alice") == "Alice"
    assert "—" in str(formats.person(None, None, 7))


def test_status_is_never_colour_alone() -> None:
    for state, symbol in (("ok", "✓"), ("failed", "✗"), ("warning", "!"), ("bogus", "?")):
        shown = str(formats.status(state, "検証"))
        assert symbol in shown and "検証" in shown


# --- catalogue -------------------------------------------------------------------------------------------


def _used_ids() -> list[str]:
    return sorted({u.msgid if isinstance(u.msgid, str) else u.msgid[0] for u in i18n.used_messages()})


@pytest.mark.parametrize("lang", formats.LANGUAGES)
@pytest.mark.parametrize("msgid", _used_ids())
def test_every_message_used_is_translated_in_both_catalogues(msgid: str, lang: formats.Lang) -> None:
    entry = i18n.read_catalogue(lang).get(msgid)
    assert entry is not None, f"{lang}: {msgid!r} missing; run python -m sekisho.controller.console.i18n update"
    assert entry.string and not entry.fuzzy, f"{lang}: {msgid!r} untranslated"
    if lang == "ja":
        assert re.search(r"[\u3040-\u30ff\u4e00-\u9fff]", str(entry.string)), f"{msgid!r} is not Japanese"


def test_the_check_names_a_message_a_template_adds_without_translating(tmp_path: Path) -> None:
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "new.html").write_text('<p>{{ _("A brand new message") }}</p>', encoding="utf-8")
    problems = i18n.missing_translations([tmp_path])
    assert any(p.startswith("ja: missing 'A brand new message'") for p in problems)
    assert any(p.startswith("en: missing 'A brand new message'") for p in problems)
    assert i18n.missing_translations() == []


def test_catalogues_are_read_from_the_po_files_and_no_mo_file_exists() -> None:
    assert i18n.gettext("ja", "Sign in") == "ログイン"
    assert i18n.gettext("en", "Sign in") == "Sign in"
    assert not list(i18n.LOCALE_DIR.rglob("*.mo"))


# --- the app ---------------------------------------------------------------------------------------------


def _config(tmp_path: Path) -> ControllerConfig:
    return ControllerConfig(
        profile="dev",
        var_dir=tmp_path,
        ca_cert=tmp_path / "ca.pem",
        tls_cert=tmp_path / "c.pem",
        tls_key=tmp_path / "c.key",
        signing_key=tmp_path / "signing.key",
    )


@pytest.fixture
def state(tmp_path: Path) -> Iterator[AppState]:
    engine = make_engine(f"sqlite:///{tmp_path / 'controller.db'}")
    upgrade(engine)
    try:
        yield AppState(_config(tmp_path), Store(engine), None)
    finally:
        engine.dispose()


def _user(state: AppState, login: str, role: Role, **extra: object) -> None:
    state.accounts.create_user(
        login=login,
        display_name="佐藤 花子",
        kana="さとう はなこ",
        role=role,
        password=PASSWORD,
        created_by="test",
        **extra,  # type: ignore[arg-type]
    )


def _signed_in(state: AppState, login: str) -> TestClient:
    client = TestClient(create_app(state), raise_server_exceptions=False)
    page = client.get("/console/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert token, page.text
    answer = client.post(
        "/console/login",
        data={"login": login, "password": PASSWORD, "csrf_token": token.group(1), "next": "/console/"},
        follow_redirects=False,
    )
    assert answer.status_code == 303, answer.text
    return client


def test_the_login_page_renders_in_japanese_by_default_and_in_english_by_cookie(state: AppState) -> None:
    client = TestClient(create_app(state))
    ja = client.get("/console/login")
    assert ja.status_code == 200
    assert '<html lang="ja">' in ja.text
    for label in (
        '<label for="login">ログイン名',
        '<label for="password">パスワード',
        '<label for="totp">ワンタイムコード',
    ):
        assert label in ja.text
    assert 'name="csrf_token" value="' in ja.text and 'action="/console/login"' in ja.text
    assert 'href="#main"' in ja.text and '<main id="main"' in ja.text
    client.cookies.set(templating.LANG_COOKIE, "en", path="/console")
    en = client.get("/console/login")
    assert '<html lang="en">' in en.text and '<label for="login">Login name' in en.text and "ログイン名" not in en.text
    client.cookies.set(templating.LANG_COOKIE, "fr", path="/console")
    assert '<html lang="ja">' in client.get("/console/login").text  # unknown language: the default


def test_language_switch_sets_a_cookie_and_returns_only_to_console_pages(state: AppState) -> None:
    client = TestClient(create_app(state))
    answer = client.get(
        "/console/lang/en", params={"next": "/console/login?next=/console/keys"}, follow_redirects=False
    )
    assert answer.status_code == 303
    assert answer.headers["location"] == "/console/login?next=/console/keys"
    cookie = answer.headers["set-cookie"]
    assert cookie.startswith("sekisho_lang=en") and "HttpOnly" in cookie and "Path=/console" in cookie
    assert "samesite=lax" in cookie.lower()
    assert '<html lang="en">' in client.get("/console/login").text
    for hostile in ("https://evil.example/", "//evil.example/console", "/\\evil.example", "/api/v1/events"):
        moved = client.get("/console/lang/ja", params={"next": hostile}, follow_redirects=False)
        assert moved.headers["location"] == "/console/", hostile
    assert client.get("/console/lang/xx", follow_redirects=False).status_code == 400


def test_a_signed_in_user_switching_language_keeps_it_in_their_account(state: AppState) -> None:
    _user(state, "fm1", Role.FACILITY_MANAGER)
    client = _signed_in(state, "fm1")
    client.get("/console/lang/en", follow_redirects=False)
    assert state.accounts.user("fm1").language == "en"


def test_signing_in_restores_the_language_kept_in_the_account(state: AppState) -> None:
    _user(state, "am1", Role.AREA_MANAGER, areas=["server-room"], language="en")
    client = _signed_in(state, "am1")
    page = client.get("/console/", follow_redirects=True)
    assert page.url.path == "/console/areas"
    assert '<html lang="en">' in page.text and "This screen is not built yet" in page.text


def test_home_sends_each_role_to_its_first_screen_which_says_it_is_not_built(state: AppState) -> None:
    _user(state, "fm1", Role.FACILITY_MANAGER)
    client = _signed_in(state, "fm1")
    home = client.get("/console/", follow_redirects=False)
    assert home.status_code == 303 and home.headers["location"] == "/console/keys"
    page = client.get("/console/keys")
    # The key register is built (registers_web.py); pages still to come say so ("my areas", for one).
    assert page.status_code == 200 and "鍵貸出管理簿" in page.text
    assert "この画面はまだ作成されていません" in client.get("/console/areas").text
    # Who is signed in: the name, the login on hover (accounts' Actor carries no kana yet).
    assert '<span class="person idhover" title="ID: fm1">佐藤 花子' in page.text
    # The navigation shows what the role may open, and no more: a facility manager has no fleet page.
    assert 'href="/console/keys" aria-current="page"' in page.text
    assert 'href="/console/fleet"' not in page.text and 'href="/console/inspection"' not in page.text
    assert 'action="/console/logout"' in page.text and 'name="csrf_token" value="' in page.text


def test_a_page_the_role_may_not_open_is_refused_with_an_error_page_in_its_language(state: AppState) -> None:
    _user(state, "fm1", Role.FACILITY_MANAGER)
    client = _signed_in(state, "fm1")
    ja = client.get("/console/fleet")
    assert ja.status_code == 403 and "権限がありません" in ja.text
    client.get("/console/lang/en")
    en = client.get("/console/fleet")
    assert en.status_code == 403 and "Not allowed" in en.text and "fleet.admin" not in en.text


def test_signed_out_pages_go_to_the_login_page_and_come_back(state: AppState) -> None:
    _user(state, "fm1", Role.FACILITY_MANAGER)  # a user exists: the dev profile's open mode is over
    client = TestClient(create_app(state))
    answer = client.get("/console/keys", follow_redirects=False)
    assert answer.status_code == 303 and answer.headers["location"] == "/console/login?next=/console/keys"


def test_not_found_and_server_errors_are_pages_in_both_languages_and_the_api_keeps_json(state: AppState) -> None:
    app = create_app(state)

    @app.get("/console/test-failure")
    def failure() -> None:
        raise RuntimeError("test: a page that fails")

    client = TestClient(app, raise_server_exceptions=False)
    missing = client.get("/console/no-such-page")
    assert missing.status_code == 404 and "ページが見つかりません" in missing.text
    assert missing.headers["content-type"].startswith("text/html")
    client.cookies.set(templating.LANG_COOKIE, "en", path="/console")
    assert "Page not found" in client.get("/console/no-such-page").text
    broken = client.get("/console/test-failure")
    assert broken.status_code == 500 and "Something went wrong" in broken.text
    assert "RuntimeError" not in broken.text and broken.headers["x-frame-options"] == "DENY"
    api = client.get("/api/v1/no-such-route")
    assert api.status_code == 404 and api.json() == {"detail": "Not Found"}


def test_console_responses_carry_the_security_headers_and_the_api_does_not_change(state: AppState) -> None:
    client = TestClient(create_app(state))
    for path in ("/console/login", "/console/no-such-page", "/console/static/console.css"):
        answer = client.get(path)
        csp = answer.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "script-src 'self'" in csp and "'unsafe-inline'" not in csp
        assert "frame-ancestors 'none'" in csp
        assert answer.headers["x-frame-options"] == "DENY"
        assert answer.headers["x-content-type-options"] == "nosniff"
        assert answer.headers["referrer-policy"] == "same-origin"
    assert client.get("/console/login").headers["cache-control"] == "no-store"
    assert "no-store" not in client.get("/console/static/console.css").headers.get("cache-control", "")
    assert "content-security-policy" not in client.get("/healthz").headers


def test_templates_have_no_inline_script_or_style() -> None:
    # The CSP refuses them; a template that relied on one would break silently in the browser.
    for template in templating.TEMPLATES_DIR.rglob("*.html"):
        text = template.read_text(encoding="utf-8")
        assert not re.search(r"<script(?![^>]*\ssrc=)", text), template
        assert "<style" not in text and " style=" not in text and " on" + "click=" not in text, template


# --- htmx: fetched at set-up, optional at run time -------------------------------------------------------


def _tarball(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _assets(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ASSETS), *args], capture_output=True, text=True, timeout=60)


def _pin(tmp_path: Path, tarball: bytes) -> Path:
    sys.path.insert(0, str(ASSETS.parent))
    try:
        import assets  # requirements/assets.py, a stand-alone script

        integrity = assets.integrity_of(tarball)
    finally:
        sys.path.remove(str(ASSETS.parent))
    pins = tmp_path / "assets.json"
    pins.write_text(
        json.dumps(
            {
                "htmx": {
                    "package": "htmx.org",
                    "version": "0.0.0-test",
                    "tarball": "https://registry.npmjs.org/htmx.org/-/htmx.org-0.0.0-test.tgz",
                    "integrity": integrity,
                    "files": {"package/dist/htmx.min.js": "controller/console/static/vendor/htmx.min.js"},
                }
            }
        ),
        encoding="utf-8",
    )
    return pins


def test_the_assets_script_writes_a_matching_tarball_and_refuses_a_tampered_one(tmp_path: Path) -> None:
    good = _tarball({"package/dist/htmx.min.js": b"/* test htmx */", "package/package.json": b"{}"})
    pins = _pin(tmp_path, good)
    (tmp_path / "good.tgz").write_bytes(good)
    tampered = bytearray(good)
    tampered[-12] ^= 0x01
    (tmp_path / "tampered.tgz").write_bytes(bytes(tampered))
    root = tmp_path / "checkout"
    target = root / "controller/console/static/vendor/htmx.min.js"

    refused = _assets("fetch", "--from", str(tmp_path / "tampered.tgz"), "--pins", str(pins), "--root", str(root))
    assert refused.returncode == 1 and "integrity mismatch" in refused.stderr
    assert not target.exists()
    assert _assets("check", "--pins", str(pins), "--root", str(root)).returncode == 1

    fetched = _assets("fetch", "--from", str(tmp_path / "good.tgz"), "--pins", str(pins), "--root", str(root))
    assert fetched.returncode == 0, fetched.stderr
    assert target.read_bytes() == b"/* test htmx */"
    assert _assets("check", "--pins", str(pins), "--root", str(root)).returncode == 0
    # A changed file no longer counts as the pinned one.
    target.write_bytes(b"/* edited */")
    assert _assets("check", "--pins", str(pins), "--root", str(root)).returncode == 1


def test_a_pin_must_name_the_npm_registry_and_a_sha512() -> None:
    pins = json.loads((ROOT / "requirements" / "assets.json").read_text(encoding="utf-8"))
    htmx = pins["htmx"]
    assert htmx["version"].startswith("2.0.")
    assert htmx["tarball"] == f"https://registry.npmjs.org/htmx.org/-/htmx.org-{htmx['version']}.tgz"
    assert re.fullmatch(r"sha512-[A-Za-z0-9+/]{86}==", htmx["integrity"])
    assert "controller/console/static/vendor/" in (ROOT / ".gitignore").read_text(encoding="utf-8")


def _console_only(state: AppState, static: Path) -> TestClient:
    app = FastAPI()
    app.state.sekisho = state
    app.include_router(accounts_router())
    web.install(app, static_dir=static)
    return TestClient(app)


def test_htmx_is_served_when_fetched_and_pages_work_without_it(state: AppState, tmp_path: Path) -> None:
    static = tmp_path / "static"
    shutil.copytree(templating.STATIC_DIR, static, ignore=shutil.ignore_patterns("vendor"))
    without = _console_only(state, static)
    page = without.get("/console/login")
    assert page.status_code == 200 and 'action="/console/login"' in page.text
    assert "htmx" not in page.text
    assert without.get("/console/static/vendor/htmx.min.js").status_code == 404

    good = _tarball({"package/dist/htmx.min.js": b"/* test htmx */"})
    pins = _pin(tmp_path, good)
    (tmp_path / "good.tgz").write_bytes(good)
    root = tmp_path / "checkout"
    assert (
        _assets("fetch", "--from", str(tmp_path / "good.tgz"), "--pins", str(pins), "--root", str(root)).returncode == 0
    )
    shutil.copytree(root / "controller/console/static/vendor", static / "vendor")
    with_htmx = _console_only(state, static)
    page = with_htmx.get("/console/login")
    assert '<script src="/console/static/vendor/htmx.min.js" defer></script>' in page.text
    assert '"allowEval": false' in page.text and '"includeIndicatorStyles": false' in page.text
    served = with_htmx.get("/console/static/vendor/htmx.min.js")
    assert served.status_code == 200 and served.content == b"/* test htmx */"
    assert served.headers["x-content-type-options"] == "nosniff"
