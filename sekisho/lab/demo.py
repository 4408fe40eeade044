"""`sekisho demo`: a whole site on this machine — broker, controller, simulated agents — until Ctrl-C."""

from __future__ import annotations

import json
import secrets
import shutil
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import pyotp
import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table

from sekisho.common.i18n import _
from sekisho.lab import Lab

console = Console()
DEMO_POLICY = Path(__file__).resolve().parents[1] / "deploy" / "demo" / "site.yaml"
DEMO_AGENTS = ("term-hr-01", "term-acc-01", "door-hr-01")
DEMO_USB_TERMINALS = {"term-hr-01": "t-hr-01"}
DEMO_DOOR_AGENTS = ("door-hr-01",)


# The API token the demo's own views use once console users exist (the dev profile's open loopback access ends
# with the first user). Set by _demo_logins; None before.
_API_TOKEN: list[str] = []


def _get(url: str) -> Any:
    request = urllib.request.Request(url)  # noqa: S310 - loopback URL built here
    if _API_TOKEN:
        request.add_header("Authorization", f"Bearer {_API_TOKEN[0]}")
    with urllib.request.urlopen(request, timeout=2) as response:  # noqa: S310 - loopback URL built here
        return json.loads(response.read())


@dataclass(frozen=True)
class DemoLogin:
    """One demo console user: synthetic name, role, password made up for this run, TOTP secret for admin roles."""

    login: str
    role: str
    name: str
    kana: str
    areas: tuple[str, ...]
    password: str
    totp_secret: str | None


# One console user per role. Every name here is synthetic.
DEMO_USERS = (
    ("demo-admin", "it_admin", "デモ 情報管理", "でも じょうほうかんり", ()),
    ("demo-facility", "facility_manager", "デモ 総務", "でも そうむ", ()),
    ("demo-security", "security", "デモ 警備", "でも けいび", ()),
    ("demo-auditor", "auditor", "デモ 監査", "でも かんさ", ()),
    ("demo-area", "area_manager", "デモ 区域責任者", "でも くいきせきにんしゃ", ("a-hr-room",)),
)


def _demo_logins(lab: Lab) -> list[DemoLogin]:
    """Create (or, on a continued run, reset) one console user per role and an API token for the demo's view.

    Passwords are made up for each run and printed; admin roles get a new TOTP secret, printed too. DEMO ONLY:
    a real site never prints a password or a TOTP secret.
    """
    from sekisho.controller.accounts.roles import ADMIN_ROLES, Role
    from sekisho.controller.accounts.service import AccountError, AccountService, AccountSettings
    from sekisho.controller.config import load_config
    from sekisho.controller.service import open_store

    config = load_config(lab.controller_config)
    store = open_store(config)
    accounts = AccountService(store, AccountSettings.from_config(config))
    made: list[DemoLogin] = []
    try:
        for login, role_name, name, kana, areas in DEMO_USERS:
            role = Role(role_name)
            password = f"demo-{secrets.token_urlsafe(9)}"
            try:
                accounts.create_user(
                    login=login, display_name=name, kana=kana, role=role, password=password, areas=areas,
                    created_by="demo",
                )  # fmt: skip
            except AccountError:
                accounts.reset_password(login, password, by="demo")  # an earlier run made it
            secret = accounts.enrol_totp(login, by="demo")[0] if role in ADMIN_ROLES else None
            made.append(DemoLogin(login, role_name, name, kana, areas, password, secret))
        token = accounts.create_token("demo-admin", f"demo-view-{secrets.token_hex(3)}", timedelta(days=1), by="demo")
        _API_TOKEN[:] = [token.token]
    finally:
        store.engine.dispose()
    return made


def _print_logins(base: str, logins: list[DemoLogin]) -> None:
    console.print(f"  console: {base}/console/", soft_wrap=True, highlight=False)
    console.print(
        _(
            "  [bold red]DEMO ONLY[/bold red]: synthetic passwords and TOTP secrets are printed here; a real site "
            "never prints or shares them"
        )
    )
    # Plain lines (never wrapped): a reader copies them, and tests read them back.
    for entry in logins:
        totp = f"  TOTP secret: {entry.totp_secret}" if entry.totp_secret else ""
        line = f"  demo login: {entry.login}  role: {entry.role}  password: {entry.password}{totp}"
        console.print(line, soft_wrap=True, highlight=False, markup=False)
    console.print(_("  TOTP: the current codes are shown in the live view below"))


def _totp_codes(logins: list[DemoLogin]) -> str:
    return ", ".join(f"{e.login} {pyotp.TOTP(e.totp_secret).now()}" for e in logins if e.totp_secret)


def _wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("the controller exited during start-up; see var/demo/logs/controller-1.log")
        try:
            if _get(f"{url}/readyz")["status"] == "ok":
                return
        except (urllib.error.URLError, OSError, ValueError, KeyError):
            pass
        time.sleep(0.3)
    raise RuntimeError("the controller did not become ready in time")


def _demo_ran_here(root: Path) -> bool:
    """Tell whether an earlier demo left its site (CA, controller database) under root."""
    return (root / "pki" / "ca.crt").exists() or (root / "controller" / "controller.db").exists()


def _start_over(root: Path) -> None:
    """Remove an earlier demo's state, refusing anything that is not a demo site."""
    root = root.resolve()
    known = {"pki", "broker", "controller", "agents", "logs"}
    strangers = sorted(p.name for p in root.iterdir() if p.name not in known)
    if strangers:
        # --fresh deletes a whole folder: only one that holds nothing but what the demo writes.
        raise typer.BadParameter(f"{root} holds more than a demo site ({', '.join(strangers)}); not removing it")
    shutil.rmtree(root)


def _lend_demo_medium(lab: Lab, base: str) -> str:
    """Lend the demo medium for the next 8 hours, or keep the loan an earlier run made if it still runs."""
    now = datetime.now(UTC)
    open_loans = _get(f"{base}/api/v1/media/loans?active=true&medium=m-0001")
    for loan in open_loans:
        if loan["person"] == "p-0001" and datetime.fromisoformat(loan["ends_at"]) > now:
            return f"{loan['id']} from the earlier run is still open (due {loan['ends_at']})"
        # An overdue loan of an earlier run comes back first, as its borrower would bring it.
        lab.sekisho("media", "return", loan["id"], "--received-by", "p-0002", "--config", str(lab.controller_config))
    lent = lab.sekisho(
        "media", "lend", "m-0001", "--person", "p-0001", "--terminal", "t-hr-01",
        "--until", (now + timedelta(hours=8)).isoformat(timespec="seconds"),
        "--purpose", "給与データの提出 (demo)", "--approved-by", "p-0002", "--config", str(lab.controller_config),
    )  # fmt: skip
    return (lent.stdout.strip().splitlines() or ["lent"])[-1]


class DemoView:
    """The live view: the newest events (followed page by page) and the door registers as they fill."""

    def __init__(self, base: str, logins: list[DemoLogin] | None = None) -> None:
        self.base = base
        self.logins = logins or []
        self.after_id: int | None = None
        self.latest: deque[dict[str, Any]] = deque(maxlen=12)
        self.total = 0

    def _follow(self) -> None:
        while True:
            query = f"?limit=1000&after_id={self.after_id}" if self.after_id is not None else "?limit=1000"
            page = _get(f"{self.base}/api/v1/events{query}")
            self.latest.extend(page["items"])
            self.total += len(page["items"])
            if page["items"]:
                self.after_id = page["items"][-1]["id"]
            if page["next_after_id"] is None:
                return

    def table(self) -> Table:
        """Fetch what is new and render it."""
        table = Table(title=_("sekisho demo — latest events (Ctrl-C to stop)"))
        for column in ("時刻 (UTC)", "agent", "seq", "type", "detail"):
            table.add_column(column)
        try:
            self._follow()
            agents = _get(f"{self.base}/api/v1/agents")
            findings = _get(f"{self.base}/api/v1/findings?open_only=true")
            dead = _get(f"{self.base}/api/v1/dead-letters?limit=1000")
            inside = _get(f"{self.base}/api/v1/areas/presence")
            loans = _get(f"{self.base}/api/v1/keys/loans?open=true")["items"]
        except (urllib.error.URLError, OSError, ValueError, KeyError):
            table.caption = "controller not answering…"
            return table
        for event in self.latest:
            payload = event["payload"]
            detail = ", ".join(
                f"{k}={v}"
                for k, v in payload.items()
                if k in ("door", "terminal", "person", "reason", "alarm", "user", "key", "cause") and v is not None
            )
            table.add_row(event["occurred_at"][11:19], event["agent_id"], str(event["seq"]), event["type"], detail)
        depth = ", ".join(f"{a['id']}: outbox {a['outbox_depth']}, policy v{a['policy_version']}" for a in agents)
        people = ", ".join(f"{p['person']}{_(' (visitor)') if p['visitor'] else ''}" for p in inside) or "-"
        keys = ", ".join(f"{loan['key']}→{loan['person']}" for loan in loans) or "-"
        table.caption = (
            f"events {self.total}  dead letters {len(dead)}  open findings {len(findings)}\n"
            f"{_('inside now: %(people)s', people=people)}\n{_('keys out: %(keys)s', keys=keys)}\n{depth}\n"
            f"console {self.base}/console/  TOTP now (demo only): {_totp_codes(self.logins)}"
        )
        return table


def demo(
    root: Annotated[Path, typer.Option(help=_("where the demo keeps its state"))] = Path("var/demo"),
    duration: Annotated[float, typer.Option(help=_("stop after this many seconds (0: until Ctrl-C)"))] = 0,
    interval: Annotated[float, typer.Option(help=_("mean seconds between simulated visits per agent"))] = 1.5,
    fresh: Annotated[bool, typer.Option("--fresh", help=_("remove an earlier run's state and start over"))] = False,
) -> None:
    """Run a demo site: its own mosquitto (mTLS + ACL), the controller on SQLite, simulated agents."""
    earlier = _demo_ran_here(root)
    if earlier and fresh:
        _start_over(root)
        console.print(f"--fresh: removed the earlier demo site under {root.resolve()}")
    elif earlier:
        # Keep the earlier site (CA, registers, agents' outboxes and sequence numbers): a re-run continues it.
        console.print(f"continuing the demo site of an earlier run under {root.resolve()} (--fresh starts over)")
    lab = Lab(root)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        console.print(f"[bold]sekisho demo[/bold] — state under {lab.root}")
        lab.start_broker()
        console.print(
            f"  broker: mosquitto with mutual TLS + per-agent ACL, agents on 127.0.0.1:{lab.broker.port}, "
            f"controllers on 127.0.0.1:{lab.broker.controller_port}"
        )
        lab.write_controller_config()
        for name in DEMO_AGENTS:
            lab.add_agent(name, heartbeat_interval_s=5)
        lab.register_agents(*DEMO_AGENTS)
        controller = lab.spawn_controller(http=True)
        base = f"http://127.0.0.1:{lab.http_port}"
        _wait_ready(base, controller)
        applied = lab.sekisho("policy", "apply", str(DEMO_POLICY), "--config", str(lab.controller_config))
        console.print("  policy: " + (applied.stdout.strip().splitlines() or ["applied"])[-1])
        # One console user per role; from now on the API wants a token (the demo view uses its own).
        logins = _demo_logins(lab)
        _print_logins(base, logins)
        # A medium lent to 見本 太郎 (p-0001) for the payroll terminal, approved by the area manager:
        # the terminal allows it read-only for him and blocks it for anyone else.
        console.print("  media loan: " + _lend_demo_medium(lab, base))
        for name in DEMO_AGENTS:
            config = str(lab.agent_config(name))
            if name in DEMO_DOOR_AGENTS:
                # The door box runs the real door agent on OSDP reader stubs and the locker board stub.
                door_module = "sekisho.agents.sim.doors"
                lab.spawn("--config", config, "--interval", str(interval), log_name=name, module=door_module)
                continue
            usb = ["--usb-terminal", DEMO_USB_TERMINALS[name]] if name in DEMO_USB_TERMINALS else []
            lab.spawn("--config", config, "--interval", str(interval), *usb, log_name=name, module="sekisho.agents.sim")
        console.print(f"  controller API: {base}/docs   events: {base}/api/v1/events")
        console.print(f"  verify records: sekisho records verify --config {lab.controller_config}")
        console.print(f"  logs: {lab.root / 'logs'}")
        started = time.monotonic()
        view = DemoView(base, logins)
        with Live(view.table(), console=console, refresh_per_second=1, transient=False) as live:
            while not stop.is_set() and (duration <= 0 or time.monotonic() - started < duration):
                stop.wait(2.0)
                live.update(view.table())
    finally:
        console.print("stopping…")
        lab.stop_all()
        console.print("stopped. State kept in " + str(lab.root))
