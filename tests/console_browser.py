"""A real site for the console's browser tests: broker, controller serving HTTP, a door agent on stubs, users.

Shared by the console's Playwright tests (import the fixtures into the test module):

    from console_browser import BrowserSite, browser, console_site, save_screenshot, signed_in  # noqa: F401

- ``console_site`` (module scope): mosquitto with mTLS + ACL on free loopback ports, the real controller in
  this process (ingest, policy keeper, door registers) with its HTTP app served by uvicorn on a free loopback
  port, the demo policy applied through the CLI, the door agent ``door-hr-01`` running in this process on the
  OSDP reader and locker board stubs (``site.door`` is the demo's DoorSite: ``site.enter("p-0001")`` taps a
  card at the controlled room's entry reader and walks through), and one console user per role created
  through the accounts service (TOTP secrets known to the test: ``site.code(login)``).
- ``browser`` (module scope): Debian's chromium driven by Playwright, headless.
- ``signed_in(role)``: a new page signed in as that role's user through the real sign-in form (a session's
  cookies are kept per role, so a second page of the same role does not spend another TOTP step: a code is
  accepted once).
- ``save_screenshot(page, name)``: a full-page PNG under tests/artifacts/ (git-ignored).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyotp
import pytest
import uvicorn
from support.lab import running_site
from support.site import wait_for

from sekisho.agents.runtime.agent import Agent
from sekisho.agents.runtime.config import load_config as load_agent_config
from sekisho.agents.runtime.lab_mode import LAB_ENV
from sekisho.agents.sim.doors import DoorSite
from sekisho.controller.accounts.roles import ADMIN_ROLES, Role
from sekisho.controller.api.app import create_app
from sekisho.controller.api.deps import AppState
from sekisho.controller.service import Controller
from sekisho.lab import Lab
from sekisho.protocol.policy import SitePolicy

playwright_sync = pytest.importorskip("playwright.sync_api")

CHROMIUM = Path("/usr/bin/chromium")
DEMO_POLICY = Path(__file__).resolve().parents[1] / "deploy" / "demo" / "site.yaml"
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
DOOR_AGENT = "door-hr-01"
# Synthetic: the same for every test user, long enough for the password policy.
PASSWORD = "browser test passphrase 01"
# One user per role; the area manager looks after the controlled room only.
USERS: dict[Role, tuple[str, str, str, tuple[str, ...]]] = {
    Role.IT_ADMIN: ("it-admin", "情報 一郎", "じょうほう いちろう", ()),
    Role.FACILITY_MANAGER: ("facility", "施設 花子", "しせつ はなこ", ()),
    Role.SECURITY: ("security", "警備 次郎", "けいび じろう", ()),
    Role.AUDITOR: ("auditor", "監査 三郎", "かんさ さぶろう", ()),
    Role.AREA_MANAGER: ("area-manager", "区域 四郎", "くいき しろう", ("a-hr-room",)),
}


@dataclass
class BrowserSite:
    """The running site a browser test drives (see the module docstring)."""

    lab: Lab
    controller: Controller
    state: AppState
    base_url: str
    agent: Agent
    door: DoorSite
    policy: SitePolicy
    logins: dict[Role, str]
    totp_secrets: dict[str, str]
    password: str = PASSWORD
    # Cookies of each role's signed-in session (Playwright storage state), filled by signed_in.
    sessions: dict[Role, Any] = field(default_factory=dict)

    def url(self, path: str) -> str:
        """Return the absolute URL of a console path."""
        return self.base_url + path

    def code(self, login: str) -> str:
        """Return the current TOTP code of an admin user (as their authenticator app shows it)."""
        return pyotp.TOTP(self.totp_secrets[login]).now()

    def enter(self, person: str) -> None:
        """The person taps their card at the controlled room's entry reader and walks in."""
        self.door.enter_or_leave(person, "entry")

    def leave(self, person: str) -> None:
        """The person taps their card at the exit reader and walks out."""
        self.door.enter_or_leave(person, "exit")

    def events(self, type_: str) -> list[dict[str, Any]]:
        """Return the payloads of the stored events of a type (what reached the controller)."""
        with self.controller.store.engine.connect() as conn:
            rows = conn.exec_driver_sql("SELECT payload FROM events WHERE type = ? ORDER BY id", (type_,)).all()
        out: list[dict[str, Any]] = []
        for (payload,) in rows:
            out.append(dict(json.loads(payload) if isinstance(payload, str) else payload))
        return out

    def wait_inside(self, person: str, area: str = "a-hr-room", timeout: float = 20) -> None:
        """Wait until the door registers show the person inside the area."""

        def inside() -> bool:
            with self.controller.store.engine.connect() as conn:
                row = conn.exec_driver_sql(
                    "SELECT inside FROM area_presence WHERE area = ? AND person = ?", (area, person)
                ).first()
            return bool(row and row[0])

        wait_for(inside, timeout, f"{person} inside {area} in the registers")


class _Server(threading.Thread):
    """uvicorn serving the controller's app in a thread, stopped by should_exit."""

    def __init__(self, app: Any, port: int) -> None:
        super().__init__(name="console-http", daemon=True)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))

    def run(self) -> None:
        self.server.run()

    def stop(self) -> None:
        self.server.should_exit = True
        self.join(timeout=10)


def _start_door_agent(lab: Lab, stop: threading.Event) -> tuple[Agent, DoorSite, SitePolicy]:
    agent = Agent(load_agent_config(lab.agent_config(DOOR_AGENT)))
    agent.start()
    policy: SitePolicy | None = None

    def has_policy() -> bool:
        nonlocal policy
        bundle = agent.policy.in_force()
        if bundle is not None:
            policy = SitePolicy.model_validate(bundle.bundle.policy)
        return policy is not None and bool(policy.doors)

    try:
        wait_for(has_policy, 30, "the door agent to apply the signed policy")
        assert policy is not None
        door = DoorSite(agent, policy, stop)
        door.attached.start()
    except BaseException:
        agent.stop()
        raise
    return agent, door, policy


@pytest.fixture(scope="module")
def console_site(pki: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrowserSite]:
    """Run the whole site for a module's browser tests (see the module docstring)."""
    root = tmp_path_factory.mktemp("console-site")
    previous_lab = os.environ.get(LAB_ENV)
    os.environ[LAB_ENV] = "1"  # the door agent runs on stubs, which only lab mode allows
    stop = threading.Event()
    try:
        with running_site(pki, root, agents=(DOOR_AGENT,), policy=DEMO_POLICY) as (lab, ctl):
            keeper = ctl.keeper
            state = AppState(
                ctl.config,
                ctl.store,
                ctl.worker.stats,
                on_policy_change=keeper.check if keeper is not None else None,
                publications=keeper.publications if keeper is not None else None,
            )
            logins: dict[Role, str] = {}
            secrets: dict[str, str] = {}
            for role, (login, name, kana, areas) in USERS.items():
                state.accounts.create_user(
                    login=login, display_name=name, kana=kana, role=role, password=PASSWORD, areas=areas,
                    created_by="test:console_browser",
                )  # fmt: skip
                if role in ADMIN_ROLES:
                    secrets[login], _ = state.accounts.enrol_totp(login, by="test:console_browser")
                logins[role] = login
            assert lab.http_port is not None
            server = _Server(create_app(state), lab.http_port)
            server.start()
            base = f"http://127.0.0.1:{lab.http_port}"
            wait_for(lambda: server.server.started, 20, "the console's HTTP server to listen")
            agent, door, policy = _start_door_agent(lab, stop)
            try:
                yield BrowserSite(lab, ctl, state, base, agent, door, policy, logins, secrets)
            finally:
                stop.set()
                door.close()
                agent.stop()
                server.stop()
    finally:
        if previous_lab is None:
            os.environ.pop(LAB_ENV, None)
        else:
            os.environ[LAB_ENV] = previous_lab


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Debian's chromium, headless, driven by Playwright (no browser download)."""
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (dev.sh installs it)")
    with playwright_sync.sync_playwright() as p:
        launched = p.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            yield launched
        finally:
            launched.close()


def sign_in_page(site: BrowserSite, page: Any, role: Role, language: str = "ja") -> None:
    """Sign in through the real form as the role's user (with a fresh TOTP code for admin roles)."""
    login = site.logins[role]
    page.goto(site.url(f"/console/lang/{language}?next=/console/login"))
    page.fill("#login", login)
    page.fill("#password", site.password)
    if login in site.totp_secrets:
        page.fill("#totp", site.code(login))
    page.click("form.login-form button[type=submit]")
    page.wait_for_load_state()
    if "/console/login" in page.url:
        raise AssertionError(f"sign-in as {login} failed: {page.inner_text('main')[:500]}")


@pytest.fixture
def signed_in(browser: Any, console_site: BrowserSite) -> Iterator[Callable[..., Any]]:
    """Return a function giving a new page signed in as a role (contexts closed after the test)."""
    contexts: list[Any] = []

    def open_page(role: Role | str, language: str = "ja") -> Any:
        role = Role(role)
        stored = console_site.sessions.get(role)
        context = (
            browser.new_context(locale="ja-JP", storage_state=stored) if stored else browser.new_context(locale="ja-JP")
        )
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(15_000)
        if stored is None:
            sign_in_page(console_site, page, role, language)
            console_site.sessions[role] = context.storage_state()
        else:
            page.goto(console_site.url(f"/console/lang/{language}?next=/console/"))
            if "/console/login" in page.url:  # the session ended (e.g. a test signed out): sign in again
                del console_site.sessions[role]
                context.close()
                contexts.remove(context)
                return open_page(role, language)
        return page

    yield open_page
    for context in contexts:
        context.close()


def save_screenshot(page: Any, name: str) -> Path:
    """Save a full-page screenshot under tests/artifacts/ (git-ignored) and return its path."""
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path
